//! A blocking HSP/1 client for tests, examples and tools.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use crate::{Frame, HEADER_LEN, MIN_LENGTH, encode_header};

/// A blocking connection to a halfsync server.
pub struct Client {
    stream: TcpStream,
}

impl Client {
    /// Connects with TCP_NODELAY and a 30 s read timeout.
    pub fn connect<A: ToSocketAddrs>(addr: A) -> io::Result<Client> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Client { stream })
    }

    /// The underlying stream (to change timeouts, shut down, or write raw bytes).
    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// Sends one request without waiting for its reply.
    pub fn send(&mut self, id: u64, command: u16, payload: &[u8]) -> io::Result<()> {
        let h = encode_header(id, command, 0, payload.len());
        self.stream.write_all(&h)?;
        self.stream.write_all(payload)
    }

    /// Reads one reply frame (any id). Frames longer than 64 MiB are refused.
    pub fn recv(&mut self) -> io::Result<Frame> {
        let mut h = [0u8; HEADER_LEN];
        self.stream.read_exact(&mut h)?;
        let length = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        if !(MIN_LENGTH..=64 << 20).contains(&length) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("reply frame length {length} out of range"),
            ));
        }
        let mut payload = vec![0u8; (length - MIN_LENGTH) as usize];
        self.stream.read_exact(&mut payload)?;
        Ok(Frame {
            id: u64::from_be_bytes([h[4], h[5], h[6], h[7], h[8], h[9], h[10], h[11]]),
            code: u16::from_be_bytes([h[12], h[13]]),
            flags: u16::from_be_bytes([h[14], h[15]]),
            payload,
        })
    }

    /// Sends one request and waits for the next reply.
    pub fn call(&mut self, id: u64, command: u16, payload: &[u8]) -> io::Result<Frame> {
        self.send(id, command, payload)?;
        self.recv()
    }
}
