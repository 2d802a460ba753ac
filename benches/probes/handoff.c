/* The floor of one wake-up hand-off on this machine, without any network
 * stack: a 1-byte ping-pong over two pipes between two threads or two
 * processes, pinned to one CPU or across the two, blocking in read(2) or in
 * epoll_wait(2) with and without a timeout (tokio parks in epoll_wait with
 * the next timer as its timeout). Also the cost of a bare system call.
 *
 *   gcc -O2 -o /tmp/handoff benches/probes/handoff.c -lpthread && /tmp/handoff
 *
 * Used by docs/benchmarks/notes.md ("Fifth pass"). Needs 2 CPUs. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <sys/epoll.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

enum { ROUNDS = 20000 };
static int ping[2], pong[2];
static int use_epoll, timeout_ms = -1;
static __thread int ep = -1;

static double now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e9 + t.tv_nsec;
}

static void pin(int cpu) {
  cpu_set_t s;
  CPU_ZERO(&s);
  if (cpu >= 0) {
    CPU_SET(cpu, &s);
  } else {
    CPU_SET(0, &s);
    CPU_SET(1, &s);
  }
  sched_setaffinity(0, sizeof s, &s);
}

static void wait_byte(int fd) {
  char c;
  if (use_epoll) {
    struct epoll_event e = {.events = EPOLLIN};
    if (ep < 0) {
      ep = epoll_create1(0);
      epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e);
    }
    epoll_wait(ep, &e, 1, timeout_ms);
  }
  if (read(fd, &c, 1) != 1) _exit(1);
}

static void *peer(void *cpu) {
  char c = 'x';
  pin((int)(long)cpu);
  for (int i = 0; i < ROUNDS; i++) {
    wait_byte(ping[0]);
    if (write(pong[1], &c, 1) != 1) _exit(1);
  }
  return NULL;
}

static void run(const char *name, int processes, int cpu0, int cpu1) {
  char c = 'x';
  pid_t child = 0;
  pthread_t thread;
  if (ep >= 0) {
    close(ep);
    ep = -1;
  }
  if (pipe(ping) || pipe(pong)) _exit(1);
  if (processes) {
    child = fork();
    if (child == 0) {
      peer((void *)(long)cpu1);
      _exit(0);
    }
  } else {
    pthread_create(&thread, NULL, peer, (void *)(long)cpu1);
  }
  pin(cpu0);
  double t0 = now_ns();
  for (int i = 0; i < ROUNDS; i++) {
    if (write(ping[1], &c, 1) != 1) _exit(1);
    wait_byte(pong[0]);
  }
  double rt = (now_ns() - t0) / ROUNDS / 1000;
  if (processes) waitpid(child, NULL, 0); else pthread_join(thread, NULL);
  printf("%-52s round trip %5.1f us, per hand-off %4.1f us\n", name, rt, rt / 2);
  close(ping[0]); close(ping[1]); close(pong[0]); close(pong[1]);
}

int main(void) {
  double t0 = now_ns();
  for (int i = 0; i < 1000000; i++) syscall(SYS_getppid);
  printf("one system call (getppid): %.0f ns\n", (now_ns() - t0) / 1e6);
  run("threads, one CPU, read", 0, 0, 0);
  run("processes, one CPU, read", 1, 0, 0);
  run("threads, CPU 0 <-> CPU 1, read", 0, 0, 1);
  run("processes, CPU 0 <-> CPU 1, read", 1, 0, 1);
  run("processes, unpinned, read", 1, -1, -1);
  use_epoll = 1;
  run("processes, one CPU, epoll_wait no timeout", 1, 0, 0);
  timeout_ms = 100;
  run("processes, one CPU, epoll_wait 100 ms timeout", 1, 0, 0);
  timeout_ms = -1;
  run("processes, CPU 0 <-> CPU 1, epoll_wait no timeout", 1, 0, 1);
  timeout_ms = 100;
  run("processes, CPU 0 <-> CPU 1, epoll_wait 100 ms timeout", 1, 0, 1);
  return 0;
}
