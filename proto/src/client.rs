//! A blocking data-wire client: one request at a time or pipelined by hand. For tools,
//! tests, and the engine's hello on a new connection; the engine's data path then
//! has its own ring-driven connections.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use crate::auth::{self, Challenge, GenerationKey};
use crate::wire::{Header, Op, Status, HEADER_LEN};

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

    /// Names the engine sending on this connection ([`Op::Hello`], with a fresh
    /// nonce): a replica claimed by a named engine takes I/O at the claim's generation
    /// only from it. Returns the reply; a replica that holds its volume's secret then
    /// wants [`Op::Prove`] (see [`BlockingClient::open`], which does both).
    pub fn hello(&mut self, id: u64, engine: &str, generation: u64) -> io::Result<(Header, Vec<u8>)> {
        self.hello_with(id, &auth::random()?, engine, generation)
    }

    fn hello_with(
        &mut self,
        id: u64,
        nonce: &[u8; auth::LEN],
        engine: &str,
        generation: u64,
    ) -> io::Result<(Header, Vec<u8>)> {
        let mut payload = nonce.to_vec();
        payload.extend_from_slice(engine.as_bytes());
        self.call(
            &Header::request(Op::Hello, id, 0, payload.len() as u32, generation),
            &payload,
        )
    }

    /// Opens the connection as engine `engine` at `key`'s generation (or at
    /// `generation` without a key): the hello, and with a key the mutual
    /// challenge–response of [`crate::auth`]. Refuses a replica that does not prove it
    /// holds the volume's secret when a key is given, and says so when the replica
    /// wants a key and none is given.
    pub fn open(&mut self, engine: &str, generation: u64, key: Option<&GenerationKey>) -> Result<(), String> {
        let generation = key.map_or(generation, GenerationKey::generation);
        let nonce = auth::random().map_err(|e| format!("cannot draw a nonce: {e}"))?;
        let (reply, answer) = self
            .hello_with(0, &nonce, engine, generation)
            .map_err(|e| format!("it did not answer the engine's hello: {e}"))?;
        if reply.status != Status::Ok {
            return Err(format!(
                "it refused the engine's hello ({}): {}",
                reply.status,
                String::from_utf8_lossy(&answer)
            ));
        }
        let key = match (key, answer.len()) {
            (None, 0) => return Ok(()),
            (None, _) => {
                return Err("it serves only its volume's engine, and this engine was given no key for the volume".into())
            }
            (Some(_), 0) => {
                return Err(
                    "it does not prove it holds the volume's secret (it runs without one): this engine serves only from replicas that do"
                        .into(),
                )
            }
            (Some(key), _) => key,
        };
        let (replica_nonce, proof) = answer.split_at(auth::LEN);
        let challenge = Challenge {
            engine_nonce: nonce,
            replica_nonce: replica_nonce
                .try_into()
                .map_err(|_| "its answer to the hello is malformed".to_string())?,
            identity: engine.as_bytes().to_vec(),
        };
        if !auth::equal(&challenge.replica_proof(key), proof) {
            return Err(format!(
                "its proof for generation {generation} is wrong: it does not hold this volume's secret"
            ));
        }
        let (reply, message) = self
            .call(
                &Header::request(Op::Prove, 1, 0, auth::LEN as u32, generation),
                &challenge.engine_proof(key),
            )
            .map_err(|e| format!("it did not answer the engine's proof: {e}"))?;
        if reply.status != Status::Ok {
            return Err(format!(
                "it refused the engine's proof ({}): {}",
                reply.status,
                String::from_utf8_lossy(&message)
            ));
        }
        Ok(())
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
