//! A blocking data-wire client: one request at a time or pipelined by hand. For tools,
//! tests, and the engine's hello on a new connection; the engine's data path then
//! has its own ring-driven connections.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use crate::wire::{Header, Op, HEADER_LEN};

/// A connection to a replica's data wire.
pub struct BlockingClient {
    stream: TcpStream,
}

impl BlockingClient {
    /// Connects, with `timeout` on every read.
    pub fn connect(addr: impl ToSocketAddrs, timeout: Duration) -> io::Result<Self> {
        BlockingClient::over(TcpStream::connect(addr)?, timeout)
    }

    /// Uses a connected `stream`, with `timeout` on every read.
    pub fn over(stream: TcpStream, timeout: Duration) -> io::Result<Self> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        Ok(BlockingClient { stream })
    }

    /// The connection, reads without a timeout again (for a caller that goes on with
    /// it on its own terms, such as the engine's ring after its hello).
    pub fn into_stream(self) -> io::Result<TcpStream> {
        self.stream.set_read_timeout(None)?;
        Ok(self.stream)
    }

    /// The socket, for tests that need to send raw bytes.
    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// Sends one message.
    pub fn send(&mut self, h: &Header, payload: &[u8]) -> io::Result<()> {
        self.stream.write_all(&h.encode())?;
        self.stream.write_all(payload)
    }

    /// Receives one reply and its payload.
    pub fn recv(&mut self) -> io::Result<(Header, Vec<u8>)> {
        let mut b = [0u8; HEADER_LEN];
        self.stream.read_exact(&mut b)?;
        let h = Header::decode(&b).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let mut p = vec![0u8; h.payload_len()];
        self.stream.read_exact(&mut p)?;
        Ok((h, p))
    }

    /// Sends one request and waits for its reply.
    pub fn call(&mut self, h: &Header, payload: &[u8]) -> io::Result<(Header, Vec<u8>)> {
        self.send(h, payload)?;
        self.recv()
    }

    /// Names the engine sending on this connection ([`Op::Hello`]): a replica claimed
    /// by a named engine takes I/O at the claim's generation only from it.
    pub fn hello(&mut self, id: u64, engine: &str, generation: u64) -> io::Result<(Header, Vec<u8>)> {
        self.call(
            &Header::request(Op::Hello, id, 0, engine.len() as u32, generation),
            engine.as_bytes(),
        )
    }

    /// Writes `data` at `offset`.
    pub fn write(
        &mut self,
        id: u64,
        offset: u64,
        data: &[u8],
        generation: u64,
    ) -> io::Result<(Header, Vec<u8>)> {
        self.call(
            &Header::request(Op::Write, id, offset, data.len() as u32, generation),
            data,
        )
    }

    /// Reads `len` bytes at `offset`.
    pub fn read(&mut self, id: u64, offset: u64, len: u32, generation: u64) -> io::Result<(Header, Vec<u8>)> {
        self.call(&Header::request(Op::Read, id, offset, len, generation), &[])
    }

    /// True once the peer has closed the connection (reads until EOF or an error).
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.stream.read(&mut b), Ok(0) | Err(_))
    }
}
