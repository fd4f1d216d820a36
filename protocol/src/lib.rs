//! HSP/1, the halfsync wire protocol: a frame codec and a small blocking
//! client.
//!
//! Every request and reply is one frame: a 16-byte header, all integers
//! big-endian, then the payload.
//!
//! | offset | size | field  | meaning                                        |
//! |--------|------|--------|------------------------------------------------|
//! | 0      | 4    | length | bytes after this field: 12 + payload length    |
//! | 4      | 8    | id     | chosen by the client; the reply carries it     |
//! | 12     | 2    | code   | request: command; reply: [`status`]            |
//! | 14     | 2    | flags  | 0 (reserved)                                   |
//!
//! Replies on one connection may arrive in any order; the id matches them.
//!
//! ```no_run
//! use halfsync_protocol::{Client, status};
//!
//! let mut c = Client::connect("127.0.0.1:7878").unwrap();
//! let reply = c.call(1, 7, b"hello").unwrap();
//! assert_eq!((reply.id, reply.code, &reply.payload[..]), (1, status::OK, &b"hello"[..]));
//! ```

#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod client;

pub use client::Client;

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 16;

/// Smallest legal value of the length field (a frame with no payload).
pub const MIN_LENGTH: u32 = 12;

/// Reply statuses. Codes below 100 belong to the server; plugins reply 0,
/// 1 or a code of 100 and above.
pub mod status {
    /// Success.
    pub const OK: u16 = 0;
    /// The plugin reported failure; the payload is its message.
    pub const PLUGIN_ERROR: u16 = 1;
    /// Overloaded: every worker saturated and the wait queue full.
    pub const BUSY: u16 = 2;
    /// Not started within the queue deadline, or killed for running past
    /// the request deadline.
    pub const TIMEOUT: u16 = 3;
    /// The worker crashed while running this request.
    pub const WORKER_DIED: u16 = 4;
    /// Malformed or oversized frame; the server closes the connection
    /// after this reply.
    pub const BAD_REQUEST: u16 = 5;
    /// No worker group serves this command.
    pub const NO_ROUTE: u16 = 6;
    /// The server is stopping; the request was not run.
    pub const SHUTTING_DOWN: u16 = 7;
    /// First code plugins may use for their own statuses.
    pub const FIRST_PLUGIN_CODE: u16 = 100;

    /// A name for a status, for logs and reports.
    pub fn name(code: u16) -> &'static str {
        match code {
            OK => "OK",
            PLUGIN_ERROR => "PLUGIN_ERROR",
            BUSY => "BUSY",
            TIMEOUT => "TIMEOUT",
            WORKER_DIED => "WORKER_DIED",
            BAD_REQUEST => "BAD_REQUEST",
            NO_ROUTE => "NO_ROUTE",
            SHUTTING_DOWN => "SHUTTING_DOWN",
            c if c >= FIRST_PLUGIN_CODE => "PLUGIN_STATUS",
            _ => "RESERVED",
        }
    }
}

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Request id.
    pub id: u64,
    /// Command (request) or status (reply).
    pub code: u16,
    /// Flags (0).
    pub flags: u16,
    /// Payload bytes that follow the header.
    pub payload_len: u32,
}

/// Why a frame cannot be accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length field is below 12.
    #[error("frame length {0} is below the minimum of 12")]
    TooShort(u32),
    /// The length field exceeds the configured maximum.
    #[error("frame length {length} exceeds max_frame {max}")]
    TooLong {
        /// Length field found.
        length: u32,
        /// Configured maximum.
        max: u32,
    },
    /// The stream starts with another protocol (its name): an HTTP
    /// request or a TLS handshake sent to an HSP/1 port, whose first four
    /// bytes read as a length far over any `max_frame`.
    #[error(
        "this looks like {0}, but this port speaks HSP/1 (each frame: a 4-byte big-endian \
         length, then an 8-byte id, a 2-byte command, 2 bytes of flags and the payload)"
    )]
    OtherProtocol(&'static str),
}

/// The protocol a stream that does not start with an HSP/1 frame seems to
/// speak, from its first four bytes.
fn other_protocol(first: &[u8]) -> Option<&'static str> {
    const HTTP: [&[u8; 4]; 9] = [
        b"GET ", b"POST", b"HEAD", b"PUT ", b"DELE", b"OPTI", b"PATC", b"CONN", b"PRI ",
    ];
    if HTTP.iter().any(|m| first.starts_with(&m[..])) {
        Some("an HTTP request")
    } else if first.starts_with(&[0x16, 0x03]) {
        Some("a TLS handshake")
    } else if first.starts_with(b"SSH-") {
        Some("an SSH client")
    } else if first.len() >= 2 && first[0] == b'*' && first[1].is_ascii_digit() {
        Some("a Redis command")
    } else if first.len() >= 4
        && first[..4]
            .iter()
            .all(|b| b.is_ascii_graphic() || *b == b' ')
    {
        // (Four printable bytes read as a length over 500 MB, beyond any
        // max_frame: never a frame.)
        Some("text (a telnet or netcat session?)")
    } else {
        None
    }
}

/// The result of looking for a frame at the start of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A whole frame: its header, and the bytes it occupies in the buffer.
    Frame(Header, usize),
    /// Not enough bytes yet; at least this many more are needed.
    Incomplete(usize),
    /// The header is illegal. `id` is the frame's id if the buffer holds
    /// it, so the error reply can carry it.
    Bad(FrameError, Option<u64>),
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Looks for one frame at the start of `buf`. A length field over
/// `max_frame` or under 12 is reported as soon as the length is known,
/// before the frame arrives.
pub fn parse(buf: &[u8], max_frame: u32) -> Parsed {
    if buf.len() < 4 {
        return Parsed::Incomplete(4 - buf.len());
    }
    let length = be_u32(buf);
    let id = (buf.len() >= 12).then(|| {
        u64::from_be_bytes([
            buf[4], buf[5], buf[6], buf[7], buf[8], buf[9], buf[10], buf[11],
        ])
    });
    if length < MIN_LENGTH {
        return Parsed::Bad(FrameError::TooShort(length), id);
    }
    if length > max_frame {
        let e = match other_protocol(buf) {
            Some(what) => FrameError::OtherProtocol(what),
            None => FrameError::TooLong {
                length,
                max: max_frame,
            },
        };
        // (The "id" of another protocol's bytes means nothing.)
        let id = id.filter(|_| !matches!(e, FrameError::OtherProtocol(_)));
        return Parsed::Bad(e, id);
    }
    let total = 4 + length as usize;
    if buf.len() < total {
        return Parsed::Incomplete(total - buf.len());
    }
    Parsed::Frame(
        Header {
            id: id.unwrap_or(0),
            code: u16::from_be_bytes([buf[12], buf[13]]),
            flags: u16::from_be_bytes([buf[14], buf[15]]),
            payload_len: length - MIN_LENGTH,
        },
        total,
    )
}

/// Encodes a frame header for a payload of `payload_len` bytes.
pub fn encode_header(id: u64, code: u16, flags: u16, payload_len: usize) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    let length = (payload_len as u64 + MIN_LENGTH as u64).min(u32::MAX as u64) as u32;
    h[0..4].copy_from_slice(&length.to_be_bytes());
    h[4..12].copy_from_slice(&id.to_be_bytes());
    h[12..14].copy_from_slice(&code.to_be_bytes());
    h[14..16].copy_from_slice(&flags.to_be_bytes());
    h
}

/// Appends a whole frame to `out`.
pub fn write_frame(out: &mut Vec<u8>, id: u64, code: u16, payload: &[u8]) {
    out.extend_from_slice(&encode_header(id, code, 0, payload.len()));
    out.extend_from_slice(payload);
}

/// A frame with its payload, as the client returns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Request id.
    pub id: u64,
    /// Command or status.
    pub code: u16,
    /// Flags.
    pub flags: u16,
    /// Payload.
    pub payload: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip() {
        let mut b = Vec::new();
        write_frame(&mut b, 0x0102030405060708, 9, b"abc");
        assert_eq!(&b[..4], &15u32.to_be_bytes());
        let Parsed::Frame(h, n) = parse(&b, 1024) else {
            panic!("no frame")
        };
        assert_eq!(n, b.len());
        assert_eq!(
            h,
            Header {
                id: 0x0102030405060708,
                code: 9,
                flags: 0,
                payload_len: 3
            }
        );
        assert_eq!(parse(&b[..10], 1024), Parsed::Incomplete(9));
    }

    #[test]
    fn bad_lengths_reported_early() {
        let mut b = 11u32.to_be_bytes().to_vec();
        assert_eq!(parse(&b, 100), Parsed::Bad(FrameError::TooShort(11), None));
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\n", 1 << 20),
            Parsed::Bad(FrameError::OtherProtocol("an HTTP request"), None)
        );
        assert_eq!(
            parse(&[0x16, 0x03, 0x01, 0x02, 0x00], 64 << 20),
            Parsed::Bad(FrameError::OtherProtocol("a TLS handshake"), None)
        );
        for (bytes, what) in [
            (&b"SSH-2.0-OpenSSH_9.6\r\n"[..], "an SSH client"),
            (&b"*1\r\n$4\r\nPING\r\n"[..], "a Redis command"),
            (&b"hello\n"[..], "text (a telnet or netcat session?)"),
        ] {
            assert_eq!(
                parse(bytes, 64 << 20),
                Parsed::Bad(FrameError::OtherProtocol(what), None)
            );
        }
        b.extend_from_slice(&5u64.to_be_bytes());
        assert_eq!(
            parse(&b, 100),
            Parsed::Bad(FrameError::TooShort(11), Some(5))
        );
        let b = 101u32.to_be_bytes();
        assert_eq!(
            parse(&b, 100),
            Parsed::Bad(
                FrameError::TooLong {
                    length: 101,
                    max: 100
                },
                None
            )
        );
    }

    proptest! {
        #[test]
        fn parse_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..64), max in 0u32..100) {
            let _ = parse(&buf, max);
        }
    }
}
