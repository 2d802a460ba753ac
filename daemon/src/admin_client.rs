//! A minimal blocking HTTP/1.1 client for the daemon's admin endpoints
//! (GET `/metrics`, `/ready`, `/config_dump`; POST `/log_level`): what
//! `nodemesh stat` / `top` / `log-level` and the lab's tests use. Owns the request, the response parser
//! (content-length, chunked, or to EOF) and the size bound; no HTTP crate on
//! the client side.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Largest response accepted (a metrics page of a busy node is well below).
pub const MAX_RESPONSE_BYTES: usize = 16 << 20;

/// A parsed response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Body (de-chunked).
    pub body: String,
}

/// `GET path` on `addr` (connecting from this process's namespace) within
/// `timeout` per step; the error says what failed.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Response, String> {
    let stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    get_over(stream, addr, path, timeout)
}

/// `GET path` over an already connected `stream` to `addr`.
pub fn get_over(
    stream: TcpStream,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<Response, String> {
    request_over(stream, addr, "GET", path, None, timeout)
}

/// `POST path` with `body` (text) on `addr` within `timeout` per step.
pub fn post(
    addr: SocketAddr,
    path: &str,
    body: &str,
    timeout: Duration,
) -> Result<Response, String> {
    let stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    request_over(stream, addr, "POST", path, Some(body), timeout)
}

fn request_over(
    mut stream: TcpStream,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<Response, String> {
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| e.to_string())?;
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(b) = body {
        request.push_str(&format!(
            "Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        ));
    } else {
        request.push_str("\r\n");
    }
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    stream
        .take(MAX_RESPONSE_BYTES as u64 + 1)
        .read_to_end(&mut raw)
        .map_err(|e| format!("read: {e}"))?;
    if raw.len() > MAX_RESPONSE_BYTES {
        return Err(format!("response over {MAX_RESPONSE_BYTES} bytes"));
    }
    parse_response(&raw).map_err(str::to_owned)
}

/// Parses a whole `Connection: close` response (content-length, chunked, or to EOF).
pub fn parse_response(raw: &[u8]) -> Result<Response, &'static str> {
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers")?;
    let head = std::str::from_utf8(&raw[..head_end]).map_err(|_| "headers not UTF-8")?;
    let body = &raw[head_end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or("empty response")?;
    let mut parts = status_line.split_whitespace();
    if !parts.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Err("not an HTTP/1.x status line");
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or("bad status code")?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let Some((k, v)) = line.split_once(':') else {
            return Err("bad header line");
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
            chunked = true;
        } else if k == "content-length" {
            length = Some(v.parse::<usize>().map_err(|_| "bad content-length")?);
        }
    }
    let body = if chunked {
        dechunk(body)?
    } else if let Some(len) = length {
        body.get(..len)
            .ok_or("body shorter than content-length")?
            .to_vec()
    } else {
        body.to_vec()
    };
    Ok(Response {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut s: &[u8]) -> Result<Vec<u8>, &'static str> {
    let mut out = Vec::new();
    loop {
        let line_end = s
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("chunk size line unterminated")?;
        let size_text = std::str::from_utf8(&s[..line_end]).map_err(|_| "bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| "bad chunk size")?;
        s = &s[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = s.get(..size).ok_or("chunk shorter than its size")?;
        out.extend_from_slice(chunk);
        s = s.get(size + 2..).ok_or("chunk not terminated")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_body() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello").expect("ok");
        assert_eq!(
            r,
            Response {
                status: 200,
                body: "hello".into()
            }
        );
    }

    #[test]
    fn chunked_body() {
        let raw = b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        let r = parse_response(raw).expect("ok");
        assert_eq!(r.status, 503);
        assert_eq!(r.body, "abcde");
    }

    #[test]
    fn body_to_eof_and_errors() {
        assert_eq!(
            parse_response(b"HTTP/1.0 404 NF\r\n\r\nx")
                .expect("ok")
                .body,
            "x"
        );
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse_response(b"SSH-2.0\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nab").is_err());
    }
}
