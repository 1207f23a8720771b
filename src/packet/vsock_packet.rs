// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! [`VsockPacket`]: its fragments, the private header copy, and the accessors every
//! constructor shares.

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{Bytes, VolatileSlice};

use super::wire::{
    BUF_ALLOC_OFFSET, DST_CID_OFFSET, DST_PORT_OFFSET, FLAGS_OFFSET, FWD_CNT_OFFSET, LEN_OFFSET,
    OP_OFFSET, SRC_CID_OFFSET, SRC_PORT_OFFSET, TYPE_OFFSET,
};
use super::{Error, Header, Result, PKT_HEADER_SIZE};

/// The vsock packet: header and data as [`VolatileSlice`]s over the memory of a descriptor chain
/// (or of driver buffers), plus a private copy of the header.
#[derive(Debug)]
pub struct VsockPacket<'a, B: BitmapSlice> {
    /// The header's first (usually only) fragment.
    pub(super) header_slice: VolatileSlice<'a, B>,
    /// Further header fragments when the header is split over descriptors (rare; no allocation
    /// when empty).
    pub(super) header_rest: Vec<VolatileSlice<'a, B>>,
    /// The private copy every getter reads.
    pub(super) header: Header,
    /// The payload's first fragment (`None` when there is no payload buffer).
    pub(super) data_slice: Option<VolatileSlice<'a, B>>,
    /// Further payload fragments, in order.
    pub(super) data_rest: Vec<VolatileSlice<'a, B>>,
    /// `data_slice` is the data slice 0.12 gives even though `data_rest` follows it: an RX
    /// chain's descriptors after the second, room 0.12 does not look at.
    pub(super) data_slice_is_ref: bool,
}

impl<'a, B: BitmapSlice> VsockPacket<'a, B> {
    /// Return a reference to the header's slice. When the header is split over several
    /// descriptors this is its first fragment; see [`VsockPacket::header_slices`].
    pub fn header_slice(&self) -> &VolatileSlice<'a, B> {
        &self.header_slice
    }

    /// The header's fragments, in order (one for every layout `virtio-vsock` 0.12 accepts).
    pub fn header_slices(&self) -> impl Iterator<Item = &VolatileSlice<'a, B>> {
        std::iter::once(&self.header_slice).chain(self.header_rest.iter())
    }

    /// Return the payload's slice when the payload (buffer) is one contiguous slice, or the
    /// slice `virtio-vsock` 0.12 gives for the same chain.
    ///
    /// `None` when the packet has no payload buffer, and also when the payload is spread over
    /// several descriptors in a layout 0.12 refuses: use [`VsockPacket::data_slices`] for the
    /// general case. For an RX chain of three or more descriptors whose head holds the header,
    /// this is 0.12's buffer, the second descriptor (`None` when it is empty), and
    /// [`VsockPacket::data_slices`] goes on with the room after it.
    pub fn data_slice(&self) -> Option<&VolatileSlice<'a, B>> {
        if self.data_rest.is_empty() || self.data_slice_is_ref {
            self.data_slice.as_ref()
        } else {
            None
        }
    }

    /// The payload's fragments in order (empty when there is no payload buffer).
    ///
    /// For a TX packet their lengths add up to the header's `len`; for an RX packet, to the
    /// capacity of the posted buffer.
    pub fn data_slices(&self) -> impl Iterator<Item = &VolatileSlice<'a, B>> {
        self.data_slice.iter().chain(self.data_rest.iter())
    }

    /// Total length of the payload fragments.
    pub fn data_len(&self) -> usize {
        self.data_slices().map(|s| s.len()).sum()
    }

    /// Copy the payload into `buf` (at most `buf.len()` bytes); returns the bytes copied.
    pub fn read_data(&self, buf: &mut [u8]) -> Result<usize> {
        self.read_data_at(0, buf)
    }

    /// Copy payload bytes from byte `offset` of the payload into `buf` (at most `buf.len()`,
    /// fewer where the payload ends); returns the bytes copied.
    pub fn read_data_at(&self, mut offset: usize, buf: &mut [u8]) -> Result<usize> {
        let mut done = 0;
        for s in self.data_slices() {
            if done == buf.len() {
                break;
            }
            if offset >= s.len() {
                offset -= s.len();
                continue;
            }
            let n = (s.len() - offset).min(buf.len() - done);
            crate::copy::from_volatile(s, offset, &mut buf[done..done + n])
                .map_err(Error::InvalidVolatileAccess)?;
            done += n;
            offset = 0;
        }
        Ok(done)
    }

    /// Copy `buf` into the payload buffer from its start; returns the bytes copied (at most the
    /// buffer's capacity). The header's `len` is not changed: call [`VsockPacket::set_len`].
    pub fn write_data(&self, buf: &[u8]) -> Result<usize> {
        self.write_data_at(0, buf)
    }

    /// Copy `buf` into the payload buffer from byte `offset` of the payload; returns the bytes
    /// copied (fewer where the buffer ends). The header's `len` is not changed.
    pub fn write_data_at(&self, mut offset: usize, buf: &[u8]) -> Result<usize> {
        let mut done = 0;
        for s in self.data_slices() {
            if done == buf.len() {
                break;
            }
            if offset >= s.len() {
                offset -= s.len();
                continue;
            }
            let n = (s.len() - offset).min(buf.len() - done);
            crate::copy::to_volatile(s, offset, &buf[done..done + n])
                .map_err(Error::InvalidVolatileAccess)?;
            done += n;
            offset = 0;
        }
        Ok(done)
    }

    /// The private copy of the header.
    pub fn header(&self) -> Header {
        self.header
    }

    /// Write a whole decoded header (to the copy and to memory).
    pub fn set_header(&mut self, header: &Header) -> &mut Self {
        self.write_header_bytes(&header.to_bytes(), 0);
        self.header = *header;
        self
    }

    /// Write to the packet header from an input of raw bytes (exactly [`PKT_HEADER_SIZE`]).
    ///
    /// # Example
    ///
    /// ```
    /// use vdpa_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
    ///
    /// let mut hdr = [0u8; PKT_HEADER_SIZE];
    /// // SAFETY: `hdr` outlives `pkt` and nothing else accesses it meanwhile.
    /// let mut pkt = unsafe { VsockPacket::new(&mut hdr, None).unwrap() };
    /// let mut raw = [0u8; PKT_HEADER_SIZE];
    /// raw[20] = 7; // dst_port = 7
    /// pkt.set_header_from_raw(&raw).unwrap();
    /// assert_eq!(pkt.dst_port(), 7);
    /// assert!(pkt.set_header_from_raw(&raw[..10]).is_err());
    /// ```
    pub fn set_header_from_raw(&mut self, bytes: &[u8]) -> Result<()> {
        let raw: &[u8; PKT_HEADER_SIZE] = bytes
            .try_into()
            .map_err(|_| Error::InvalidHeaderInputSize(bytes.len()))?;
        self.write_header_bytes(raw, 0);
        // Re-read what memory now holds, as 0.12 does, so the copy matches memory exactly.
        let mut copy = [0u8; PKT_HEADER_SIZE];
        self.read_header_bytes(&mut copy)?;
        self.header = Header::from_bytes(&copy);
        Ok(())
    }

    /// Write `bytes` at `offset` of the header, across fragments. The offsets used here are all
    /// inside the 44 header bytes that every constructor guarantees, so writes cannot fail.
    #[inline]
    fn write_header_bytes(&self, bytes: &[u8], offset: usize) {
        if self.header_rest.is_empty() {
            // The whole header is in `header_slice`, which is at least PKT_HEADER_SIZE long.
            let _ = self.header_slice.write_slice(bytes, offset);
            return;
        }
        let mut frag_start = 0;
        for s in self.header_slices() {
            let frag_end = frag_start + s.len();
            let lo = offset.max(frag_start);
            let hi = (offset + bytes.len()).min(frag_end);
            if lo < hi {
                let _ = s.write_slice(&bytes[lo - offset..hi - offset], lo - frag_start);
            }
            frag_start = frag_end;
        }
    }

    pub(super) fn read_header_bytes(&self, out: &mut [u8; PKT_HEADER_SIZE]) -> Result<()> {
        let mut done = 0;
        for s in self.header_slices() {
            let n = s.len().min(PKT_HEADER_SIZE - done);
            s.read_slice(&mut out[done..done + n], 0)
                .map_err(Error::InvalidVolatileAccess)?;
            done += n;
        }
        Ok(())
    }
}

macro_rules! header_field {
    ($(#[$gdoc:meta])* $get:ident, $(#[$sdoc:meta])* $set:ident, $field:ident, $ty:ty, $offset:ident) => {
        impl<'a, B: BitmapSlice> VsockPacket<'a, B> {
            $(#[$gdoc])*
            #[inline]
            pub fn $get(&self) -> $ty {
                self.header.$field
            }
            $(#[$sdoc])*
            #[inline]
            pub fn $set(&mut self, value: $ty) -> &mut Self {
                self.header.$field = value;
                self.write_header_bytes(&value.to_le_bytes(), $offset);
                self
            }
        }
    };
}

header_field!(
    /// Return the `src_cid` of the header.
    src_cid,
    /// Set the `src_cid` of the header.
    set_src_cid, src_cid, u64, SRC_CID_OFFSET
);
header_field!(
    /// Return the `dst_cid` of the header.
    dst_cid,
    /// Set the `dst_cid` of the header.
    set_dst_cid, dst_cid, u64, DST_CID_OFFSET
);
header_field!(
    /// Return the `src_port` of the header.
    src_port,
    /// Set the `src_port` of the header.
    set_src_port, src_port, u32, SRC_PORT_OFFSET
);
header_field!(
    /// Return the `dst_port` of the header.
    dst_port,
    /// Set the `dst_port` of the header.
    set_dst_port, dst_port, u32, DST_PORT_OFFSET
);
header_field!(
    /// Return the `len` of the header.
    len,
    /// Set the `len` of the header.
    set_len, len, u32, LEN_OFFSET
);
header_field!(
    /// Return the `type` of the header.
    type_,
    /// Set the `type` of the header.
    set_type, type_, u16, TYPE_OFFSET
);
header_field!(
    /// Return the `op` of the header.
    op,
    /// Set the `op` of the header.
    set_op, op, u16, OP_OFFSET
);
header_field!(
    /// Return the `flags` of the header.
    flags,
    /// Set the `flags` of the header.
    set_flags, flags, u32, FLAGS_OFFSET
);
header_field!(
    /// Return the `buf_alloc` of the header.
    buf_alloc,
    /// Set the `buf_alloc` of the header.
    set_buf_alloc, buf_alloc, u32, BUF_ALLOC_OFFSET
);
header_field!(
    /// Return the `fwd_cnt` of the header.
    fwd_cnt,
    /// Set the `fwd_cnt` of the header.
    set_fwd_cnt, fwd_cnt, u32, FWD_CNT_OFFSET
);

impl<'a, B: BitmapSlice> VsockPacket<'a, B> {
    /// Returns whether the `len` field of the header is 0.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Set a specific flag of the header (OR it into `flags`).
    pub fn set_flag(&mut self, flag: u32) -> &mut Self {
        self.set_flags(self.flags() | flag)
    }
}
