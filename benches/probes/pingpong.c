/* A 64-byte TCP ping-pong at a fixed gap between requests, for looking at
 * one request through a lab with perf, strace or /proc while nothing else
 * of the benchmark runs. The benchmark's own latency figure is the
 * open-loop one of `nodemesh-lab bench`; this is a probe, not a figure.
 *
 *   gcc -O2 -o /tmp/pingpong benches/probes/pingpong.c
 *   ip netns exec nml-n2-p1 /tmp/pingpong server 7000 &
 *   ip netns exec nml-n1-p1 /tmp/pingpong client 10.78.2.2 7000 5000 900
 *     (5,000 requests, 900 us of sleep after each: about 1,000 req/s)
 *   ip netns exec nml-n1-p1 /tmp/pingpong conns 10.78.2.2 7000 2000 0
 *     (2,000 new connections one after the other: connect, 64 bytes each
 *     way, close, as the benchmark's new-connection figure does)
 *
 * Used by docs/benchmarks/notes.md ("Fifth pass"). */
#include <arpa/inet.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e9 + t.tv_nsec;
}

static int by_value(const void *a, const void *b) {
  double d = *(const double *)a - *(const double *)b;
  return (d > 0) - (d < 0);
}

int main(int argc, char **argv) {
  char buf[64] = {0};
  int one = 1;
  if (argc == 3 && !strcmp(argv[1], "server")) {
    int l = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(l, (void *)&a, sizeof a) || listen(l, 16)) { perror("listen"); return 1; }
    for (;;) {
      int c = accept(l, NULL, NULL), n;
      if (c < 0) continue;
      setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      while ((n = read(c, buf, sizeof buf)) > 0)
        if (write(c, buf, n) != n) break;
      close(c);
    }
  }
  int conns = argc == 6 && !strcmp(argv[1], "conns");
  if (argc != 6 || (strcmp(argv[1], "client") && !conns)) {
    fprintf(stderr, "usage: %s server PORT | client|conns ADDR PORT REQUESTS GAP_US\n", argv[0]);
    return 2;
  }
  int n = atoi(argv[4]), gap_us = atoi(argv[5]);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
  if (n <= 0 || inet_pton(AF_INET, argv[2], &a.sin_addr) != 1) { fprintf(stderr, "bad arguments\n"); return 2; }
  double *lat = malloc(n * sizeof *lat);
  int c = -1;
  for (int i = 0; i < n; i++) {
    double t0 = now_ns();
    if (c < 0) {
      c = socket(AF_INET, SOCK_STREAM, 0);
      if (connect(c, (void *)&a, sizeof a)) { perror("connect"); return 1; }
      setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    if (write(c, buf, sizeof buf) != sizeof buf) { perror("write"); return 1; }
    for (size_t got = 0; got < sizeof buf;) {
      ssize_t r = read(c, buf + got, sizeof buf - got);
      if (r <= 0) { fprintf(stderr, "connection closed\n"); return 1; }
      got += r;
    }
    if (conns) {
      close(c);
      c = -1;
    }
    lat[i] = now_ns() - t0;
    if (gap_us > 0) usleep(gap_us);
  }
  qsort(lat, n, sizeof *lat, by_value);
  printf("%d %s: p50 %.1f us, p99 %.1f us\n", n, conns ? "connections" : "requests", lat[n / 2] / 1000, lat[n * 99 / 100] / 1000);
  return 0;
}
