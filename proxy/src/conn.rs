//! Client connections: the slab that holds them and the per-connection
//! buffers. The reading, framing and sending live in `event_loop.rs`.

use std::net::TcpStream;

use halfsync_protocol as hsp;

use crate::sys::{READ, WRITE};

/// Most requests one connection may have in flight before the proxy stops
/// reading from it (back-pressure instead of unbounded memory).
pub(crate) const MAX_CONN_INFLIGHT: u32 = 4096;
/// Most bytes one connection may have buffered in the proxy, unsent reply
/// bytes plus the payloads of its unanswered requests (whose copies sit in
/// the wait queue or the rings), before the proxy stops reading from it.
/// With what is read past it (one read) and the replies still to come for
/// those requests, a connection that never reads holds a few MiB at most,
/// and for `idle_timeout` at most (see `Conn::stalled_since_ns`). Deep
/// pipelines of large payloads fit: 16 × 16 KiB is a quarter of it.
pub(crate) const MAX_CONN_BUFFERED: u64 = 1 << 20;

/// Identifies one incarnation of a connection: slab index and generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Tag(pub(crate) u64);

impl Tag {
    pub(crate) fn new(index: usize, generation: u32) -> Tag {
        Tag(((generation as u64) << 32) | index as u64)
    }
    pub(crate) fn index(self) -> usize {
        (self.0 & 0xffff_ffff) as usize
    }
    pub(crate) fn generation(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

pub(crate) struct Conn {
    pub(crate) stream: TcpStream,
    /// Bytes of an incomplete frame carried over between reads.
    pub(crate) inbuf: Vec<u8>,
    /// When the frame begun in `inbuf` started to arrive (meaningful
    /// while `inbuf` is not empty). Past `idle_timeout`, with nothing else
    /// pending, the connection is closed.
    pub(crate) frame_since_ns: u64,
    pub(crate) out: Vec<u8>,
    pub(crate) out_pos: usize,
    /// Requests accepted from this connection and not yet answered.
    pub(crate) inflight: u32,
    /// Payload bytes of those requests.
    pub(crate) inflight_bytes: u64,
    pub(crate) last_active_ns: u64,
    /// Since when its replies wait for a peer that does not read them (a
    /// send made no progress since then, and nothing left the kernel's
    /// send queue); 0 while it reads. Past `idle_timeout` the connection
    /// is closed.
    pub(crate) stalled_since_ns: u64,
    /// The kernel's unacknowledged bytes at the last look (see
    /// `Proxy::run_timers`): a reader slower than our sends shows its
    /// progress there, as the queue shrinks between our sends.
    pub(crate) unacked: u32,
    /// What epoll watches for this connection.
    pub(crate) interest: u32,
    /// The peer finished sending.
    pub(crate) eof: bool,
    /// No more requests are read: close once answered and flushed.
    pub(crate) closing: bool,
    /// Already in the dirty list.
    pub(crate) dirty: bool,
    /// Closing gracefully: every reply sent and our side shut down (the
    /// peer reads EOF after its last reply), and what the peer still sends
    /// is read and dropped until it closes too or until this time, when
    /// the connection is closed. A close with unread data would reset the
    /// connection, and a reset makes the peer's kernel drop the replies it
    /// has not read yet (nginx's lingering close). 0 while open.
    pub(crate) linger_until_ns: u64,
    /// During a stop: bytes the peer had sent when it began and the proxy
    /// had not read yet (its reading paused behind replies), still to be
    /// read and answered SHUTTING_DOWN before the connection closes.
    pub(crate) drain_owed: u64,
}

impl Conn {
    pub(crate) fn has_output(&self) -> bool {
        self.out_pos < self.out.len()
    }

    pub(crate) fn push_reply(&mut self, id: u64, code: u16, payload: &[u8]) {
        self.out
            .extend_from_slice(&hsp::encode_header(id, code, 0, payload.len()));
        self.out.extend_from_slice(payload);
    }

    pub(crate) fn wanted_interest(&self) -> u32 {
        if self.linger_until_ns != 0 {
            return if self.eof { 0 } else { READ };
        }
        let mut i = 0;
        if !self.eof
            && !self.closing
            && self.inflight < MAX_CONN_INFLIGHT
            && self.inflight_bytes + ((self.out.len() - self.out_pos) as u64) < MAX_CONN_BUFFERED
        {
            i |= READ;
        }
        if self.has_output() && self.interest & WRITE != 0 {
            // Stay armed until the buffer drains.
            i |= WRITE;
        }
        i
    }
}

/// Connections in a slab indexed by epoll token. Generations survive a
/// slot's reuse so a late reply for a closed connection is recognised.
pub(crate) struct Conns {
    pub(crate) slab: Vec<Option<Conn>>,
    pub(crate) generations: Vec<u32>,
    pub(crate) free: Vec<usize>,
    pub(crate) live: usize,
    /// Connections with output to send this turn.
    pub(crate) dirty: Vec<usize>,
}

impl Conns {
    pub(crate) fn insert(&mut self, conn: Conn) -> usize {
        self.live += 1;
        if let Some(i) = self.free.pop() {
            self.slab[i] = Some(conn);
            i
        } else {
            self.slab.push(Some(conn));
            self.generations.push(0);
            self.slab.len() - 1
        }
    }

    pub(crate) fn get(&mut self, tag: Tag) -> Option<&mut Conn> {
        let i = tag.index();
        if self.generations.get(i) != Some(&tag.generation()) {
            return None;
        }
        self.slab.get_mut(i)?.as_mut()
    }

    pub(crate) fn tag(&self, i: usize) -> Tag {
        Tag::new(i, self.generations[i])
    }

    pub(crate) fn mark_dirty(&mut self, i: usize) {
        if let Some(Some(c)) = self.slab.get_mut(i)
            && !c.dirty
        {
            c.dirty = true;
            self.dirty.push(i);
        }
    }

    /// Delivers a reply to the connection `tag` names, if it still exists.
    /// `request_len` is the payload length of the request it answers.
    pub(crate) fn deliver(
        &mut self,
        tag: Tag,
        id: u64,
        code: u16,
        payload: &[u8],
        request_len: u32,
        now_ns: u64,
    ) {
        if let Some(c) = self.get(tag) {
            c.push_reply(id, code, payload);
            c.inflight = c.inflight.saturating_sub(1);
            c.inflight_bytes = c.inflight_bytes.saturating_sub(request_len.into());
            c.last_active_ns = now_ns;
            self.mark_dirty(tag.index());
        }
    }
}
