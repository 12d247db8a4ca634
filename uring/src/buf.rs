//! `IoBuf`: a heap buffer aligned for O_DIRECT, owned by whoever has the I/O in hand.
//!
//! The store takes the buffer for the duration of an I/O and hands it back in the
//! completion, so the kernel never writes into memory that has been freed or moved.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

/// Alignment of every `IoBuf`: enough for O_DIRECT on any device with 4 KiB sectors.
pub const IO_ALIGN: usize = 4096;

/// A zero-initialised, 4 KiB-aligned byte buffer, or (see [`IoBuf::borrowed`]) a view
/// of memory someone else owns, such as a ublk queue's per-tag buffer.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// Allocated here, and freed on drop.
    owned: bool,
}

// SAFETY: IoBuf owns its allocation exclusively, like a Box<[u8]>.
unsafe impl Send for IoBuf {}
// SAFETY: shared references only read the bytes, like &[u8].
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// A buffer of `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        if len == 0 {
            return IoBuf {
                ptr: NonNull::<[u8; IO_ALIGN]>::dangling().cast(),
                len: 0,
                owned: false,
            };
        }
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        IoBuf {
            ptr,
            len,
            owned: true,
        }
    }

    /// A view of `len` bytes at `ptr` that someone else owns; dropping it frees nothing.
    /// This is how a frontend hands the engine the buffer the kernel filled (ublk)
    /// without a copy.
    ///
    /// # Safety
    /// `ptr` must be valid for reads and writes of `len` bytes, initialised, for as long
    /// as the returned buffer lives, and nothing else may access that memory meanwhile.
    pub unsafe fn borrowed(ptr: *mut u8, len: usize) -> Self {
        match NonNull::new(ptr) {
            Some(ptr) => IoBuf {
                ptr,
                len,
                owned: false,
            },
            None => IoBuf::zeroed(0),
        }
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut b = Self::zeroed(data.len());
        b.as_mut_slice().copy_from_slice(data);
        b
    }

    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len, IO_ALIGN).expect("I/O buffer size overflows")
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Is the buffer empty?
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised bytes (or dangling with len 0).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Raw pointer for the kernel; valid while the buffer lives and is not moved out of.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        if self.owned && self.len != 0 {
            // SAFETY: allocated in `zeroed` with this same layout.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
        }
    }
}

/// Buffers kept for I/Os that overwrite them wholly before anyone reads them (a
/// write's data received from a socket), so that large I/Os do not each fault in and
/// zero a fresh allocation. Bounded in bytes. Small buffers are not kept: the
/// allocator serves them from memory already mapped.
pub struct SpareBufs {
    spare: Vec<IoBuf>,
    held: usize,
    max_bytes: usize,
}

impl SpareBufs {
    /// The smallest buffer kept.
    pub const MIN_LEN: usize = 64 << 10;

    /// Keeps at most `max_bytes`.
    pub fn new(max_bytes: usize) -> SpareBufs {
        SpareBufs {
            spare: Vec::new(),
            held: 0,
            max_bytes,
        }
    }

    /// A buffer of `len` bytes: a kept one, which still holds an earlier I/O's bytes
    /// (so only for an I/O that overwrites all of it), or a fresh zeroed one.
    pub fn take(&mut self, len: usize) -> IoBuf {
        match self.spare.iter().rposition(|b| b.len == len) {
            Some(i) => {
                self.held -= len;
                self.spare.swap_remove(i)
            }
            None => IoBuf::zeroed(len),
        }
    }

    /// Keeps `buf` for a later [`SpareBufs::take`] if it is large enough, was
    /// allocated here, and fits the bound; frees it otherwise.
    pub fn keep(&mut self, buf: IoBuf) {
        if buf.owned && buf.len >= Self::MIN_LEN && self.held + buf.len <= self.max_bytes {
            self.held += buf.len;
            self.spare.push(buf);
        }
    }

    /// Frees every buffer kept (the I/O they served is over).
    pub fn release(&mut self) {
        self.spare.clear();
        self.held = 0;
    }

    /// Bytes kept now.
    pub fn held(&self) -> usize {
        self.held
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IoBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spare_buffers_come_back_by_length_within_the_bound() {
        let mut spare = SpareBufs::new(3 * SpareBufs::MIN_LEN);
        let mut a = spare.take(SpareBufs::MIN_LEN);
        a.as_mut_slice().fill(7);
        let at = a.as_mut_ptr();
        spare.keep(a);
        assert_eq!(spare.held(), SpareBufs::MIN_LEN);
        // Another length gets a fresh, zeroed buffer; the same length the kept one.
        let fresh = spare.take(2 * SpareBufs::MIN_LEN);
        assert!(fresh.as_slice().iter().all(|&b| b == 0));
        let mut again = spare.take(SpareBufs::MIN_LEN);
        assert_eq!(again.as_mut_ptr(), at);
        assert_eq!(spare.held(), 0);
        // Small, borrowed, or over the bound: freed, not kept.
        spare.keep(IoBuf::zeroed(4096));
        let mut outside = [0u8; SpareBufs::MIN_LEN];
        // SAFETY: `outside` outlives the view, which nothing else touches.
        spare.keep(unsafe { IoBuf::borrowed(outside.as_mut_ptr(), outside.len()) });
        assert_eq!(spare.held(), 0);
        spare.keep(again);
        spare.keep(fresh);
        spare.keep(IoBuf::zeroed(SpareBufs::MIN_LEN));
        assert_eq!(spare.held(), 3 * SpareBufs::MIN_LEN);
        spare.release();
        assert_eq!(spare.held(), 0);
        assert!(spare.take(SpareBufs::MIN_LEN).as_slice().iter().all(|&b| b == 0));
    }
}
