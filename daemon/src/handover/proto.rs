//! The hand-over protocol's messages and their framing, sans IO.
//!
//! One JSON object per line over `<run dir>/handover.sock`, each line at most
//! [`MAX_LINE_BYTES`] (newline included). The successor (N) speaks first; the
//! running daemon (O) answers each request with exactly one message:
//!
//! | N sends | O answers | meaning |
//! |---|---|---|
//! | `{"type":"hello","version":1,"pid":P}` | `{"type":"welcome","version":1,"pid":P,"cid_tag":T}` | a successor is starting; O's QUIC CID tag is T |
//! | `{"type":"stop_cni"}` | `{"type":"cni_stopped"}` | N owns `cni.sock` now; O has stopped serving CNI and finished its requests |
//! | `{"type":"take_over"}` | `{"type":"done"}` | N is ready; O has closed its listeners and stopped accepting |
//! | anything O cannot do | `{"type":"error","message":"..."}` | refused; N carries on as if alone |
//!
//! Decoding never panics: an oversized, unterminated, non-UTF-8 or malformed
//! line is a [`ProtoError`]. Unknown fields are ignored (a newer daemon may
//! say more); an incompatible change bumps [`VERSION`].

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Version spoken by this daemon.
pub const VERSION: u32 = 1;
/// Longest line accepted, newline included.
pub const MAX_LINE_BYTES: usize = 4096;

/// One message of the hand-over protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// N → O: a successor is starting.
    Hello {
        /// Protocol version of N.
        version: u32,
        /// N's process id (logs, `/config_dump`).
        pid: u32,
    },
    /// O → N: accepted; O reports not ready from now on.
    Welcome {
        /// Protocol version of O.
        version: u32,
        /// O's process id.
        pid: u32,
        /// First byte of every QUIC connection ID O issued (1..=255).
        cid_tag: u8,
    },
    /// N → O: N has renamed its CNI socket over `cni.sock`; stop serving it.
    StopCni,
    /// O → N: O's CNI listener is closed and its requests are answered.
    CniStopped,
    /// N → O: N serves everything; close your listeners.
    TakeOver,
    /// O → N: O has closed its listeners and accepts nothing new.
    Done,
    /// Either way: the request cannot be honoured.
    Error {
        /// Why, for logs.
        message: String,
    },
}

impl Message {
    /// The message's `type`, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Hello { .. } => "hello",
            Self::Welcome { .. } => "welcome",
            Self::StopCni => "stop_cni",
            Self::CniStopped => "cni_stopped",
            Self::TakeOver => "take_over",
            Self::Done => "done",
            Self::Error { .. } => "error",
        }
    }
}

/// Why a line is not a message, or a message could not be exchanged.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The line is longer than [`MAX_LINE_BYTES`].
    #[error("hand-over message longer than {MAX_LINE_BYTES} bytes")]
    TooLong,
    /// The peer closed the connection before a complete line.
    #[error("hand-over connection closed before a complete message")]
    Truncated,
    /// The line is not valid JSON of a known message.
    #[error("malformed hand-over message: {0}")]
    Malformed(String),
    /// The peer answered something else than the protocol step expects.
    #[error("unexpected hand-over message `{got}` (expected `{expected}`)")]
    Unexpected {
        /// What the step expects.
        expected: &'static str,
        /// What came.
        got: &'static str,
    },
    /// The peer refused the request.
    #[error("hand-over refused by the peer: {0}")]
    Refused(String),
    /// The peer speaks another version.
    #[error("hand-over version {got} not supported (this daemon speaks {VERSION})")]
    Version {
        /// Its version.
        got: u32,
    },
    /// The socket failed.
    #[error("hand-over socket: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes `msg` as one line.
pub fn encode(msg: &Message) -> Result<Vec<u8>, ProtoError> {
    let mut line = serde_json::to_vec(msg).map_err(|e| ProtoError::Malformed(e.to_string()))?;
    line.push(b'\n');
    if line.len() > MAX_LINE_BYTES {
        return Err(ProtoError::TooLong);
    }
    Ok(line)
}

/// Decodes one complete line (it must end with a newline).
pub fn decode(line: &[u8]) -> Result<Message, ProtoError> {
    if line.len() > MAX_LINE_BYTES {
        return Err(ProtoError::TooLong);
    }
    let Some(body) = line.strip_suffix(b"\n") else {
        return Err(ProtoError::Truncated);
    };
    serde_json::from_slice(body).map_err(|e| ProtoError::Malformed(e.to_string()))
}

/// Reads one message; `Ok(None)` on a clean end of stream before any byte.
pub async fn read<R: AsyncBufRead + Unpin>(r: &mut R) -> Result<Option<Message>, ProtoError> {
    let mut line = Vec::with_capacity(128);
    let n = r
        .take(MAX_LINE_BYTES as u64 + 1)
        .read_until(b'\n', &mut line)
        .await?;
    if n == 0 {
        return Ok(None);
    }
    if line.len() > MAX_LINE_BYTES {
        return Err(ProtoError::TooLong);
    }
    decode(&line).map(Some)
}

/// Writes one message.
pub async fn write<W: AsyncWrite + Unpin>(w: &mut W, msg: &Message) -> Result<(), ProtoError> {
    w.write_all(&encode(msg)?).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::BufReader;

    fn all() -> Vec<Message> {
        vec![
            Message::Hello {
                version: VERSION,
                pid: 42,
            },
            Message::Welcome {
                version: VERSION,
                pid: 7,
                cid_tag: 0xa1,
            },
            Message::StopCni,
            Message::CniStopped,
            Message::TakeOver,
            Message::Done,
            Message::Error {
                message: "busy".into(),
            },
        ]
    }

    #[test]
    fn every_message_round_trips_as_one_line() {
        for m in all() {
            let line = encode(&m).expect("encode");
            assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
            assert!(line.ends_with(b"\n"));
            assert_eq!(decode(&line).expect("decode"), m);
        }
    }

    #[test]
    fn wire_form_is_the_documented_one() {
        assert_eq!(
            encode(&Message::Hello { version: 1, pid: 9 }).expect("encode"),
            b"{\"type\":\"hello\",\"version\":1,\"pid\":9}\n"
        );
        assert_eq!(
            encode(&Message::TakeOver).expect("encode"),
            b"{\"type\":\"take_over\"}\n"
        );
    }

    #[test]
    fn malformed_input_is_a_typed_error() {
        let cases: &[&[u8]] = &[
            b"\n",
            b"not json\n",
            b"{}\n",
            b"{\"type\":\"hello\"}\n",
            b"{\"type\":\"hello\",\"version\":1,\"pid\":-1}\n",
            b"{\"type\":\"welcome\",\"version\":1,\"pid\":1,\"cid_tag\":256}\n",
            b"{\"type\":\"nope\"}\n",
            b"\xff\xfe\n",
            b"[1,2]\n",
        ];
        for c in cases {
            assert!(
                matches!(decode(c), Err(ProtoError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(c)
            );
        }
        // Unknown fields are ignored.
        assert_eq!(
            decode(b"{\"type\":\"done\",\"extra\":1}\n").expect("lenient"),
            Message::Done
        );
        assert!(matches!(
            decode(b"{\"type\":\"done\"}"),
            Err(ProtoError::Truncated)
        ));
        let long = vec![b' '; MAX_LINE_BYTES + 1];
        assert!(matches!(decode(&long), Err(ProtoError::TooLong)));
        let long_message = Message::Error {
            message: "x".repeat(MAX_LINE_BYTES),
        };
        assert!(matches!(encode(&long_message), Err(ProtoError::TooLong)));
    }

    #[tokio::test]
    async fn reader_bounds_the_line_and_reports_truncation() {
        // Oversized without a newline: refused after MAX+1 bytes, not buffered forever.
        let big = vec![b'a'; 10 * MAX_LINE_BYTES];
        let mut r = BufReader::new(&big[..]);
        assert!(matches!(read(&mut r).await, Err(ProtoError::TooLong)));
        // Clean end of stream.
        let mut r = BufReader::new(&b""[..]);
        assert!(matches!(read(&mut r).await, Ok(None)));
        // Cut mid-line.
        let mut r = BufReader::new(&b"{\"type\":\"do"[..]);
        assert!(matches!(read(&mut r).await, Err(ProtoError::Truncated)));
        // Two messages back to back.
        let mut buf = encode(&Message::StopCni).expect("encode");
        buf.extend(encode(&Message::TakeOver).expect("encode"));
        let mut r = BufReader::new(&buf[..]);
        assert_eq!(read(&mut r).await.expect("1"), Some(Message::StopCni));
        assert_eq!(read(&mut r).await.expect("2"), Some(Message::TakeOver));
        assert_eq!(read(&mut r).await.expect("eof"), None);
    }

    #[tokio::test]
    async fn writer_and_reader_talk_over_a_pipe() {
        let (a, b) = tokio::io::duplex(64);
        let mut b = BufReader::new(b);
        let mut a = a;
        for m in all() {
            write(&mut a, &m).await.expect("write");
            assert_eq!(read(&mut b).await.expect("read"), Some(m));
        }
    }
}
