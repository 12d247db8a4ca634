//! `SendBatch`: the messages queued on one data-wire connection, sent many to a
//! `writev`; and `TwoPartRecv`, a payload's rest and the next header in one receive.
//!
//! Both ends keep at most one send in the kernel per connection. Whatever has queued
//! up meanwhile goes out together in the next one, up to [`MAX_BATCH`] messages:
//! headers and payloads side by side in one iovec array, so at queue depth 32 one
//! system call carries many requests or replies instead of one each. Payloads are
//! sent from where they live; nothing is copied.

use std::collections::VecDeque;

use crate::wire::{frame_iovecs, HEADER_LEN};

/// Most messages in one send (two iovecs each, far under `IOV_MAX`).
pub const MAX_BATCH: usize = 64;

/// A message as a batch sends it.
pub trait Message {
    /// The encoded header.
    fn header(&self) -> &[u8; HEADER_LEN];
    /// The payload as pointer and length (length 0: none). It must stay valid and in
    /// place while the message is in the batch.
    fn payload(&self) -> (*const u8, usize);
}

/// The messages queued on one connection and the send in flight.
pub struct SendBatch<M: Message> {
    queue: VecDeque<Box<M>>,
    /// Messages of the send in the kernel, in order.
    sending: VecDeque<Box<M>>,
    /// Bytes of `sending[0]` already sent by earlier sends.
    first_sent: usize,
    iov: Vec<libc::iovec>,
    busy: bool,
}

// SAFETY: the iovecs point only into the boxed messages the batch owns (headers) and
// their payloads, which the `Message` contract keeps in place while they are held.
unsafe impl<M: Message + Send> Send for SendBatch<M> {}

impl<M: Message> Default for SendBatch<M> {
    fn default() -> Self {
        SendBatch {
            queue: VecDeque::new(),
            sending: VecDeque::new(),
            first_sent: 0,
            iov: Vec::with_capacity(2 * MAX_BATCH),
            busy: false,
        }
    }
}

impl<M: Message> SendBatch<M> {
    /// Queues a message.
    pub fn push(&mut self, m: Box<M>) {
        self.queue.push_back(m);
    }

    /// Is a send in the kernel?
    pub fn is_busy(&self) -> bool {
        self.busy
    }

    /// Nothing queued and nothing being sent?
    pub fn is_idle(&self) -> bool {
        !self.busy && self.queue.is_empty() && self.sending.is_empty()
    }

    /// The iovecs of the next send, if there is something to send and no send is in
    /// the kernel. They stay valid until [`SendBatch::sent`] or [`SendBatch::take_all`].
    pub fn next_send(&mut self) -> Option<(*const libc::iovec, u32)> {
        if self.busy {
            return None;
        }
        while self.sending.len() < MAX_BATCH {
            match self.queue.pop_front() {
                Some(m) => self.sending.push_back(m),
                None => break,
            }
        }
        if self.sending.is_empty() {
            return None;
        }
        self.iov.clear();
        let mut pair = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; 2];
        for (i, m) in self.sending.iter().enumerate() {
            let sent = if i == 0 { self.first_sent } else { 0 };
            let n = frame_iovecs(m.header(), m.payload(), sent, &mut pair);
            self.iov.extend_from_slice(&pair[..n]);
        }
        self.busy = true;
        Some((self.iov.as_ptr(), self.iov.len() as u32))
    }

    /// The send in the kernel wrote `n` bytes: hands each message now fully sent to
    /// `done`, in order. Call [`SendBatch::next_send`] for the rest.
    pub fn sent(&mut self, mut n: usize, mut done: impl FnMut(Box<M>)) {
        self.busy = false;
        while let Some(m) = self.sending.front() {
            let left = HEADER_LEN + m.payload().1 - self.first_sent;
            if n < left {
                self.first_sent += n;
                return;
            }
            n -= left;
            self.first_sent = 0;
            done(self.sending.pop_front().expect("checked"));
        }
    }

    /// Takes every message, queued or being sent (the connection is gone). The caller
    /// must not free payloads a send still in the kernel points at before it completes.
    pub fn take_all(&mut self) -> impl Iterator<Item = Box<M>> + '_ {
        self.busy = false;
        self.first_sent = 0;
        self.sending.drain(..).chain(self.queue.drain(..))
    }

    /// Takes only the queued messages no send has touched.
    pub fn take_queued(&mut self) -> impl Iterator<Item = Box<M>> + '_ {
        self.queue.drain(..)
    }
}

/// The arguments of a two-part `recvmsg` (the rest of a payload, then the next
/// header), boxed so they stay in place while the receive is in the kernel.
pub struct TwoPartRecv {
    msg: libc::msghdr,
    iov: [libc::iovec; 2],
}

// SAFETY: the pointers name this box's own iovecs and buffers its owner keeps alive for
// the receive; they move between threads only with their owner, while no receive is in
// flight.
unsafe impl Send for TwoPartRecv {}

impl TwoPartRecv {
    /// Empty arguments.
    pub fn new() -> Box<TwoPartRecv> {
        Box::new(TwoPartRecv {
            // SAFETY: msghdr is plain data; all zeros is its empty value.
            msg: unsafe { std::mem::zeroed() },
            iov: [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; 2],
        })
    }

    /// Points the receive at `first` then `second` (pointer and length each) and
    /// returns the msghdr for `IORING_OP_RECVMSG`. Both buffers must stay valid until
    /// the receive completes.
    pub fn prepare(&mut self, first: (*mut u8, usize), second: (*mut u8, usize)) -> *mut libc::msghdr {
        self.iov[0] = libc::iovec {
            iov_base: first.0.cast(),
            iov_len: first.1,
        };
        self.iov[1] = libc::iovec {
            iov_base: second.0.cast(),
            iov_len: second.1,
        };
        self.msg.msg_iov = self.iov.as_mut_ptr();
        self.msg.msg_iovlen = 2;
        &mut self.msg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Msg {
        header: [u8; HEADER_LEN],
        payload: Vec<u8>,
    }

    impl Message for Msg {
        fn header(&self) -> &[u8; HEADER_LEN] {
            &self.header
        }
        fn payload(&self) -> (*const u8, usize) {
            (self.payload.as_ptr(), self.payload.len())
        }
    }

    fn msg(tag: u8, len: usize) -> Box<Msg> {
        Box::new(Msg {
            header: [tag; HEADER_LEN],
            payload: vec![tag; len],
        })
    }

    /// Gathers what the iovecs of a send point at, up to `limit` bytes.
    fn gather(iov: *const libc::iovec, n: u32, limit: usize) -> Vec<u8> {
        // SAFETY: the batch's iovecs point at live headers and payloads.
        let iov = unsafe { std::slice::from_raw_parts(iov, n as usize) };
        let mut out = Vec::new();
        for v in iov {
            // SAFETY: as above.
            out.extend_from_slice(unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) });
        }
        out.truncate(limit);
        out
    }

    #[test]
    fn partial_sends_resume_mid_message_and_deliver_every_byte_once_in_order() {
        let mut b = SendBatch::default();
        let sizes = [0usize, 4096, 7, 0, 100];
        let mut want = Vec::new();
        for (i, &len) in sizes.iter().enumerate() {
            let m = msg(i as u8 + 1, len);
            want.extend_from_slice(&m.header);
            want.extend_from_slice(&m.payload);
            b.push(m);
        }
        let mut got = Vec::new();
        let mut done = Vec::new();
        // The kernel takes 1, then 39, then 1000 bytes at a time.
        for step in [1usize, 39].into_iter().chain(std::iter::repeat(1000)) {
            let Some((iov, n)) = b.next_send() else { break };
            assert!(b.next_send().is_none(), "one send at a time");
            let chunk = gather(iov, n, step);
            got.extend_from_slice(&chunk);
            b.sent(chunk.len(), |m| done.push(m.header[0]));
        }
        assert_eq!(got, want);
        assert_eq!(done, vec![1, 2, 3, 4, 5]);
        assert!(b.is_idle());
    }

    #[test]
    fn a_batch_holds_at_most_max_batch_messages() {
        let mut b = SendBatch::default();
        for i in 0..(MAX_BATCH + 3) {
            b.push(msg(i as u8, 0));
        }
        let (_, n) = b.next_send().unwrap();
        assert_eq!(n as usize, MAX_BATCH);
        let mut count = 0;
        b.sent(MAX_BATCH * HEADER_LEN, |_| count += 1);
        assert_eq!(count, MAX_BATCH);
        let (_, n) = b.next_send().unwrap();
        assert_eq!(n, 3);
        assert_eq!(b.take_all().count(), 3);
        assert!(b.is_idle());
    }
}
