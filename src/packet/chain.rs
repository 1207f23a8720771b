// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The device view: a descriptor chain walked into a [`VsockPacket`] (`from_tx_virtq_chain`,
//! `from_rx_virtq_chain`), by the layout rules of the module docs.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::bitmap::{BitmapSlice, WithBitmapSlice};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemory, Permissions, VolatileMemory, VolatileSlice,
};

use super::lookup::{get_single_slice, Lookup};
use super::{Error, Header, Result, VsockPacket, PKT_HEADER_LEN, PKT_HEADER_SIZE};

/// Read the header at the start of `slice` (at least [`PKT_HEADER_SIZE`] bytes) into a private
/// copy, every byte exactly once: five 8-byte and one 4-byte volatile loads, where a
/// `read_slice` of a runtime length goes through a `memcpy` call.
#[inline(always)]
fn read_header<B: BitmapSlice>(slice: &VolatileSlice<'_, B>) -> Result<Header> {
    let words: [u64; 5] = slice
        .get_ref::<[u64; 5]>(0)
        .map_err(Error::InvalidVolatileAccess)?
        .load();
    let tail: u32 = slice
        .get_ref::<u32>(40)
        .map_err(Error::InvalidVolatileAccess)?
        .load();
    // Native-endian bytes are the bytes as they were in memory; `from_bytes` decodes them.
    let mut raw = [0u8; PKT_HEADER_SIZE];
    for (bytes, word) in raw.chunks_exact_mut(8).zip(words) {
        bytes.copy_from_slice(&word.to_ne_bytes());
    }
    raw[40..].copy_from_slice(&tail.to_ne_bytes());
    Ok(Header::from_bytes(&raw))
}

/// Which buffers a chain must hold.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Device-readable (driver to device).
    Tx,
    /// Device-writable (device to driver).
    Rx,
}

impl Direction {
    #[inline]
    fn check(self, write_only: bool, index: usize) -> Result<()> {
        match (self, write_only) {
            (Direction::Tx, true) => Err(Error::UnexpectedWriteOnlyDescriptor { index }),
            (Direction::Rx, false) => Err(Error::UnexpectedReadOnlyDescriptor { index }),
            _ => Ok(()),
        }
    }
    #[inline]
    fn access(self) -> Permissions {
        match self {
            Direction::Tx => Permissions::Read,
            Direction::Rx => Permissions::Write,
        }
    }
}

/// `DescriptorChainTooShort`: a TX payload but no descriptor holding it.
const NO_PAYLOAD_DESC: &str = "expected a descriptor holding the packet payload after the header";
/// `DescriptorChainTooShort`: an RX chain with no room after the header.
const NO_RX_ROOM: &str = "expected room for a payload after the header, found none";

/// A TX header's `len` must not exceed the negotiated maximum.
#[inline(always)]
fn check_tx_len(len: u32, max: u32) -> Result<()> {
    if len > max {
        return Err(Error::InvalidHeaderLen { len, max });
    }
    Ok(())
}

/// A descriptor as the parser needs it.
#[derive(Clone, Copy)]
struct Desc {
    addr: GuestAddress,
    len: u32,
    write_only: bool,
    has_next: bool,
}

#[inline]
fn next_desc<T>(chain: &mut DescriptorChain<T>) -> Option<Desc>
where
    T: Deref,
    T::Target: GuestMemory,
{
    chain.next().map(|d| Desc {
        addr: d.addr(),
        len: d.len(),
        write_only: d.is_write_only(),
        has_next: d.has_next(),
    })
}

/// Where a split header ended: the descriptor that held its last byte and how much of it is
/// left.
struct HeaderEnd {
    /// Index of that descriptor in the chain.
    index: usize,
    /// The descriptor.
    desc: Desc,
    /// Bytes of it the header used.
    used: u32,
}

/// A split header as [`VsockPacket::parse_split_header`] found it: its fragments and its
/// private copy.
struct HeaderParts<'a, B> {
    /// The first (usually only) fragment.
    slice: VolatileSlice<'a, B>,
    /// Further fragments of a split header.
    rest: Vec<VolatileSlice<'a, B>>,
    /// The private copy (zeroed for RX).
    header: Header,
}

impl<'a, B: BitmapSlice> HeaderParts<'a, B> {
    /// The packet, from its parts.
    #[inline(always)]
    fn into_packet(self, data: Fragments<'a, B>) -> VsockPacket<'a, B> {
        VsockPacket::assemble(self.slice, self.rest, self.header, data)
    }
}

/// Fragments in chain order, the first apart so that the common one-fragment case allocates
/// nothing.
struct Fragments<'a, B> {
    first: Option<VolatileSlice<'a, B>>,
    rest: Vec<VolatileSlice<'a, B>>,
}

impl<B> Default for Fragments<'_, B> {
    fn default() -> Self {
        Fragments {
            first: None,
            rest: Vec::new(),
        }
    }
}

impl<'a, B> Fragments<'a, B> {
    #[inline(always)]
    fn push(&mut self, slice: VolatileSlice<'a, B>) {
        if self.first.is_none() {
            self.first = Some(slice);
        } else {
            self.rest.push(slice);
        }
    }
}

impl<'a, B: BitmapSlice> VsockPacket<'a, B> {
    /// Pop the head descriptor and check its direction.
    #[inline(always)]
    fn pop_head<T>(chain: &mut DescriptorChain<T>, dir: Direction) -> Result<Desc>
    where
        T: Deref,
        T::Target: GuestMemory,
    {
        let head = next_desc(chain).ok_or(Error::DescriptorChainTooShort(
            "expected a head descriptor holding the packet header, found an empty chain",
        ))?;
        dir.check(head.write_only, 0)?;
        Ok(head)
    }

    /// The packet, assembled once from its parts (no partly built packet is moved around).
    #[inline(always)]
    fn assemble(
        header_slice: VolatileSlice<'a, B>,
        header_rest: Vec<VolatileSlice<'a, B>>,
        header: Header,
        data: Fragments<'a, B>,
    ) -> Self {
        VsockPacket {
            header_slice,
            header_rest,
            header,
            data_slice: data.first,
            data_rest: data.rest,
            data_slice_is_ref: false,
        }
    }

    /// Gather a header split over descriptors (the head is shorter than a header; beyond 0.12):
    /// its fragments and private copy (zeroed for RX, which is not read), and where it ended.
    fn parse_split_header<M, T>(
        lookup: &Lookup<'a, M, B>,
        chain: &mut DescriptorChain<T>,
        dir: Direction,
        head: Desc,
    ) -> Result<(HeaderParts<'a, B>, HeaderEnd)>
    where
        M: GuestMemory,
        M::Bitmap: WithBitmapSlice<'a, S = B>,
        T: Deref,
        T::Target: GuestMemory,
    {
        if !head.has_next {
            return Err(Error::DescriptorLengthTooSmall {
                expected: PKT_HEADER_SIZE as u64,
                found: u64::from(head.len),
            });
        }
        let mut raw = [0u8; PKT_HEADER_SIZE];
        let mut got = 0usize;
        let mut frags = Fragments::default();
        let mut desc = head;
        let mut index = 0;
        loop {
            let take = (desc.len as usize).min(PKT_HEADER_SIZE - got);
            if take > 0 {
                let slice = lookup.slice(desc.addr, take)?;
                if dir == Direction::Tx {
                    slice
                        .read_slice(&mut raw[got..got + take], 0)
                        .map_err(Error::InvalidVolatileAccess)?;
                }
                got += take;
                frags.push(slice);
            }
            if got == PKT_HEADER_SIZE {
                let end = HeaderEnd {
                    index,
                    desc,
                    // `take` is at most PKT_HEADER_SIZE here.
                    used: u32::try_from(take).unwrap_or(PKT_HEADER_LEN),
                };
                let slice = frags
                    .first
                    .ok_or(Error::DescriptorChainTooShort("no header fragment"))?;
                let parts = HeaderParts {
                    slice,
                    rest: frags.rest,
                    // RX headers are not read: `raw` stayed zeroed.
                    header: Header::from_bytes(&raw),
                };
                return Ok((parts, end));
            }
            desc = match next_desc(chain) {
                Some(d) => d,
                None => {
                    return Err(Error::DescriptorLengthTooSmall {
                        expected: PKT_HEADER_SIZE as u64,
                        found: got as u64,
                    })
                }
            };
            index += 1;
            dir.check(desc.write_only, index)?;
        }
    }

    /// Create the packet wrapper from a TX chain (device view: the buffers are device-readable).
    ///
    /// The chain starts with the header; the payload (`len` bytes) follows, in the head
    /// descriptor after the header or in the following descriptors (see the module docs for the
    /// exact layout rules).
    ///
    /// # Arguments
    ///
    /// * `mem` - the memory that holds the queue buffers.
    /// * `desc_chain` - the descriptor chain corresponding to a packet.
    /// * `max_data_size` - the largest payload accepted.
    ///
    /// # Example
    ///
    /// ```
    /// use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    /// use virtio_queue::mock::MockSplitQueue;
    /// use virtio_queue::{Queue, QueueT};
    /// use vdpa_vsock::packet::{Op, VsockPacket};
    /// use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    ///
    /// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    /// let vq = MockSplitQueue::new(&mem, 16);
    /// let mut queue: Queue = vq.create_queue().unwrap();
    /// // Header (op RW, len 5) in one descriptor, payload in two more.
    /// let mut hdr = [0u8; 44];
    /// hdr[24] = 5;
    /// hdr[30] = Op::Rw as u8;
    /// mem.write_slice(&hdr, GuestAddress(0x5_0000)).unwrap();
    /// mem.write_slice(b"hel", GuestAddress(0x6_0000)).unwrap();
    /// mem.write_slice(b"lo", GuestAddress(0x7_0000)).unwrap();
    /// vq.build_desc_chain(&[
    ///     RawDescriptor::from(SplitDescriptor::new(0x5_0000, 44, 0, 0)),
    ///     RawDescriptor::from(SplitDescriptor::new(0x6_0000, 3, 0, 0)),
    ///     RawDescriptor::from(SplitDescriptor::new(0x7_0000, 2, 0, 0)),
    /// ]).unwrap();
    ///
    /// let mut chain = queue.pop_descriptor_chain(&mem).unwrap();
    /// let pkt = VsockPacket::from_tx_virtq_chain(&mem, &mut chain, 64 * 1024).unwrap();
    /// assert_eq!(pkt.op(), Op::Rw as u16);
    /// let mut data = [0u8; 5];
    /// pkt.read_data(&mut data).unwrap();
    /// assert_eq!(&data, b"hello");
    /// assert!(pkt.data_slice().is_none()); // fragmented: use data_slices()
    /// assert_eq!(pkt.data_slices().count(), 2);
    /// ```
    pub fn from_tx_virtq_chain<M, T>(
        mem: &'a M,
        desc_chain: &mut DescriptorChain<T>,
        max_data_size: u32,
    ) -> Result<Self>
    where
        M: GuestMemory,
        M::Bitmap: WithBitmapSlice<'a, S = B>,
        T: Deref,
        T::Target: GuestMemory,
    {
        let head = Self::pop_head(desc_chain, Direction::Tx)?;
        let lookup = Lookup::new(mem, head.addr, Direction::Tx.access());
        if (head.len as usize) < PKT_HEADER_SIZE {
            return Self::tx_split_header(&lookup, desc_chain, max_data_size, head);
        }
        // The whole header in the head descriptor: every layout 0.12 accepts.
        let header_slice = lookup.slice(head.addr, PKT_HEADER_SIZE)?;
        // Read the header once, from the slice (no second address translation).
        let header = read_header(&header_slice)?;
        let want = header.len;
        let mut data = Fragments::default();
        // A header-only packet: anything after the header is ignored.
        if want > 0 {
            check_tx_len(want, max_data_size)?;
            if head.has_next {
                // The 0.12 rule: a head holding the whole header and followed by another
                // descriptor leaves the payload to the next descriptor (the head's remaining
                // bytes are padding).
                Self::tx_payload(&lookup, desc_chain, &mut data, want, want as usize, 0, true)?;
            } else {
                // One descriptor (Linux 6.2 and later): the payload follows the header. Refuse
                // a head too short for it before touching memory (0.12 answers "chain too
                // short" here whatever the buffer's address).
                if head.len - PKT_HEADER_LEN < want {
                    return Err(Error::DescriptorChainTooShort(NO_PAYLOAD_DESC));
                }
                let addr = head.addr.checked_add(PKT_HEADER_SIZE as u64).ok_or(
                    Error::DescriptorLengthTooSmall {
                        expected: PKT_HEADER_SIZE as u64 + u64::from(want),
                        found: u64::from(head.len),
                    },
                )?;
                data.push(lookup.slice(addr, want as usize)?);
            }
        }
        Ok(Self::assemble(header_slice, Vec::new(), header, data))
    }

    /// [`Self::from_tx_virtq_chain`] for a header split over descriptors (beyond 0.12): the
    /// payload starts right after the header's last byte.
    #[inline(never)]
    fn tx_split_header<M, T>(
        lookup: &Lookup<'a, M, B>,
        desc_chain: &mut DescriptorChain<T>,
        max_data_size: u32,
        head: Desc,
    ) -> Result<Self>
    where
        M: GuestMemory,
        M::Bitmap: WithBitmapSlice<'a, S = B>,
        T: Deref,
        T::Target: GuestMemory,
    {
        let (parts, end) = Self::parse_split_header(lookup, desc_chain, Direction::Tx, head)?;
        let want = parts.header.len;
        let mut data = Fragments::default();
        if want == 0 {
            return Ok(parts.into_packet(data));
        }
        check_tx_len(want, max_data_size)?;
        let mut need = want as usize;
        let leftover = end.desc.len - end.used;
        if leftover > 0 {
            if !end.desc.has_next && (leftover as usize) < need {
                return Err(Error::DescriptorChainTooShort(NO_PAYLOAD_DESC));
            }
            let take = (leftover as usize).min(need);
            let addr = end.desc.addr.checked_add(u64::from(end.used)).ok_or(
                Error::DescriptorLengthTooSmall {
                    expected: PKT_HEADER_SIZE as u64 + u64::from(want),
                    found: u64::from(end.desc.len),
                },
            )?;
            data.push(lookup.slice(addr, take)?);
            need -= take;
        }
        Self::tx_payload(
            lookup,
            desc_chain,
            &mut data,
            want,
            need,
            end.index,
            end.desc.has_next,
        )?;
        Ok(parts.into_packet(data))
    }

    /// The last `need` bytes of a TX payload of `want` bytes, from the descriptors after the
    /// one at `index` (which has a next descriptor if `has_next`). Descriptors after the
    /// payload are ignored.
    #[inline(always)]
    fn tx_payload<M, T>(
        lookup: &Lookup<'a, M, B>,
        desc_chain: &mut DescriptorChain<T>,
        data: &mut Fragments<'a, B>,
        want: u32,
        mut need: usize,
        mut index: usize,
        mut has_next: bool,
    ) -> Result<()>
    where
        M: GuestMemory,
        M::Bitmap: WithBitmapSlice<'a, S = B>,
        T: Deref,
        T::Target: GuestMemory,
    {
        let mut data_descs = 0usize;
        while need > 0 {
            let desc = match (has_next, next_desc(desc_chain)) {
                (true, Some(d)) => d,
                _ if data_descs == 0 => {
                    return Err(Error::DescriptorChainTooShort(NO_PAYLOAD_DESC))
                }
                _ => {
                    return Err(Error::DescriptorLengthTooSmall {
                        expected: u64::from(want),
                        found: (want as usize - need) as u64,
                    })
                }
            };
            index += 1;
            data_descs += 1;
            has_next = desc.has_next;
            Direction::Tx.check(desc.write_only, index)?;
            // The last descriptor must hold the rest: check its length before its address, as
            // 0.12 does.
            if !desc.has_next && (desc.len as usize) < need {
                return Err(Error::DescriptorLengthTooSmall {
                    expected: u64::from(want),
                    found: (want as usize - need) as u64 + u64::from(desc.len),
                });
            }
            let take = (desc.len as usize).min(need);
            if take > 0 {
                data.push(lookup.slice(desc.addr, take)?);
                need -= take;
            }
        }
        Ok(())
    }

    /// Create the packet wrapper from an RX chain (device view: the buffers are device-writable).
    ///
    /// The header comes first; the payload buffer follows (see the module docs, rules 4 and
    /// 5: the second descriptor as in 0.12, then any valid extra room up to `max_data_size`
    /// bytes). As in 0.12, a chain whose only room is the header is refused.
    ///
    /// # Example
    ///
    /// ```
    /// use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    /// use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    /// use virtio_queue::mock::MockSplitQueue;
    /// use virtio_queue::{Queue, QueueT};
    /// use vdpa_vsock::packet::{Op, VsockPacket};
    /// use vm_memory::{GuestAddress, GuestMemoryMmap};
    ///
    /// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    /// let vq = MockSplitQueue::new(&mem, 16);
    /// let mut queue: Queue = vq.create_queue().unwrap();
    /// let w = VRING_DESC_F_WRITE as u16;
    /// vq.build_desc_chain(&[
    ///     RawDescriptor::from(SplitDescriptor::new(0x5_0000, 44, w, 0)),
    ///     RawDescriptor::from(SplitDescriptor::new(0x6_0000, 4096, w, 0)),
    /// ]).unwrap();
    ///
    /// let mut chain = queue.pop_descriptor_chain(&mem).unwrap();
    /// let mut pkt = VsockPacket::from_rx_virtq_chain(&mem, &mut chain, 64 * 1024).unwrap();
    /// let n = pkt.write_data(b"pong").unwrap();
    /// pkt.set_op(Op::Rw as u16).set_len(n as u32).set_src_cid(2).set_dst_cid(3);
    /// assert_eq!(pkt.len(), 4);
    /// ```
    pub fn from_rx_virtq_chain<M, T>(
        mem: &'a M,
        desc_chain: &mut DescriptorChain<T>,
        max_data_size: u32,
    ) -> Result<Self>
    where
        M: GuestMemory,
        M::Bitmap: WithBitmapSlice<'a, S = B>,
        T: Deref,
        T::Target: GuestMemory,
    {
        let head = Self::pop_head(desc_chain, Direction::Rx)?;
        if (head.len as usize) < PKT_HEADER_SIZE {
            let lookup = Lookup::new(mem, head.addr, Direction::Rx.access());
            return Self::rx_split_header(&lookup, desc_chain, max_data_size, head);
        }
        // The whole header in the head descriptor: every layout 0.12 accepts.
        if !head.has_next {
            return Self::rx_one_desc(mem, head);
        }
        // As in 0.12, the head's remaining bytes are padding and the buffer is the second
        // descriptor, with 0.12's verdicts: it must exist, be device-writable, hold at most
        // `max_data_size` bytes and be one slice of memory. The descriptors after it, which
        // 0.12 ignores, are extra room (`rx_with_extra`).
        let lookup = Lookup::new(mem, head.addr, Direction::Rx.access());
        let header_slice = lookup.slice(head.addr, PKT_HEADER_SIZE)?;
        let second = next_desc(desc_chain).ok_or(Error::DescriptorChainTooShort(
            "expected a payload descriptor after the header, found the chain's end",
        ))?;
        if !second.write_only {
            return Err(Error::UnexpectedReadOnlyDescriptor { index: 1 });
        }
        if second.len > max_data_size {
            return Err(Error::DescriptorLengthTooLong {
                max: u64::from(max_data_size),
                found: u64::from(second.len),
            });
        }
        if second.has_next {
            return Self::rx_with_extra(lookup, desc_chain, max_data_size, header_slice, second);
        }
        // Each packet is built where it is returned, its slices straight from their lookups:
        // an `Option` of a slice chosen first and copied in after is two 8-byte stores read
        // back as one 16-byte load, a store-forwarding stall; a packet built and then changed
        // is moved with a `memcpy` call.
        if second.len == 0 {
            return Ok(Self::rx_packet(header_slice, None));
        }
        let data = lookup.slice(second.addr, second.len as usize)?;
        Ok(Self::rx_packet(header_slice, Some(data)))
    }

    /// The rest of [`Self::from_rx_virtq_chain`] when the second descriptor (0.12's buffer,
    /// already checked) has a next one. The descriptors after it are extra room in
    /// [`VsockPacket::data_slices`] as far as they are device-writable and inside memory, and
    /// only up to `max_data_size` bytes in all: the first that is not ends the buffer without
    /// failing the chain. [`VsockPacket::data_slice`] stays 0.12's buffer.
    #[inline(never)]
    fn rx_with_extra<M, T>(
        lookup: Lookup<'a, M, B>,
        desc_chain: &mut DescriptorChain<T>,
        max_data_size: u32,
        header_slice: VolatileSlice<'a, B>,
        second: Desc,
    ) -> Result<Self>
    where
        M: GuestMemory,
        M::Bitmap: WithBitmapSlice<'a, S = B>,
        T: Deref,
        T::Target: GuestMemory,
    {
        let data_slice = if second.len > 0 {
            Some(lookup.slice(second.addr, second.len as usize)?)
        } else {
            None
        };
        let data_rest = Self::rx_extra(&lookup, desc_chain, max_data_size - second.len);
        Ok(VsockPacket {
            header_slice,
            header_rest: Vec::new(),
            header: Header::default(),
            data_slice,
            data_rest,
            data_slice_is_ref: true,
        })
    }

    /// An RX packet whose header is in one slice, with at most one data slice: built in place
    /// (no `Fragments` moved into it). The RX header is not read: the copy stays zeroed (as
    /// 0.12) until the setters fill it.
    #[inline(always)]
    fn rx_packet(
        header_slice: VolatileSlice<'a, B>,
        data_slice: Option<VolatileSlice<'a, B>>,
    ) -> Self {
        VsockPacket {
            header_slice,
            header_rest: Vec::new(),
            header: Header::default(),
            data_slice,
            data_rest: Vec::new(),
            data_slice_is_ref: false,
        }
    }

    /// [`Self::from_rx_virtq_chain`] for one descriptor holding the header and the buffer
    /// (Linux 6.2 and later; 0.12 puts no bound on the buffer).
    ///
    /// When the whole descriptor is one slice of memory, the header and the buffer are its two
    /// parts: the same pointers and lengths as a lookup of each, with one lookup instead of
    /// two. Otherwise the two lookups are made in 0.12's order, for 0.12's verdict.
    #[inline(always)]
    fn rx_one_desc<M>(mem: &'a M, head: Desc) -> Result<Self>
    where
        M: GuestMemory,
        M::Bitmap: WithBitmapSlice<'a, S = B>,
    {
        let access = Direction::Rx.access();
        if head.len > PKT_HEADER_LEN {
            if let Ok(whole) = get_single_slice(mem, head.addr, head.len as usize, access) {
                // `whole` is `head.len` > PKT_HEADER_SIZE bytes long, so both parts are in it.
                if let (Ok(header_slice), Ok(data)) = (
                    whole.subslice(0, PKT_HEADER_SIZE),
                    whole.offset(PKT_HEADER_SIZE),
                ) {
                    return Ok(Self::rx_packet(header_slice, Some(data)));
                }
            }
        }
        let header_slice = get_single_slice(mem, head.addr, PKT_HEADER_SIZE, access)?;
        let leftover = head.len - PKT_HEADER_LEN;
        if leftover == 0 {
            return Err(Error::DescriptorChainTooShort(NO_RX_ROOM));
        }
        let addr = head.addr.checked_add(PKT_HEADER_SIZE as u64).ok_or(
            Error::DescriptorLengthTooSmall {
                expected: PKT_HEADER_SIZE as u64,
                found: u64::from(head.len),
            },
        )?;
        let data = get_single_slice(mem, addr, leftover as usize, access)?;
        Ok(Self::rx_packet(header_slice, Some(data)))
    }

    /// [`Self::from_rx_virtq_chain`] for a header split over descriptors (beyond 0.12): the
    /// buffer starts right after the header's last byte.
    #[inline(never)]
    fn rx_split_header<M, T>(
        lookup: &Lookup<'a, M, B>,
        desc_chain: &mut DescriptorChain<T>,
        max_data_size: u32,
        head: Desc,
    ) -> Result<Self>
    where
        M: GuestMemory,
        M::Bitmap: WithBitmapSlice<'a, S = B>,
        T: Deref,
        T::Target: GuestMemory,
    {
        let (parts, end) = Self::parse_split_header(lookup, desc_chain, Direction::Rx, head)?;
        let mut data = Fragments::default();
        let leftover = end.desc.len - end.used;
        let mut total: u64 = 0;
        if leftover > 0 {
            // The leftover counts against the maximum like any other payload descriptor.
            if leftover > max_data_size {
                return Err(Error::DescriptorLengthTooLong {
                    max: u64::from(max_data_size),
                    found: u64::from(leftover),
                });
            }
            let addr = end.desc.addr.checked_add(u64::from(end.used)).ok_or(
                Error::DescriptorLengthTooSmall {
                    expected: PKT_HEADER_SIZE as u64,
                    found: u64::from(end.desc.len),
                },
            )?;
            data.push(lookup.slice(addr, leftover as usize)?);
            total = u64::from(leftover);
        }
        if !end.desc.has_next {
            if total == 0 {
                return Err(Error::DescriptorChainTooShort(NO_RX_ROOM));
            }
            return Ok(parts.into_packet(data));
        }
        Self::rx_payload(
            lookup,
            desc_chain,
            &mut data,
            max_data_size,
            total,
            end.index,
        )?;
        Ok(parts.into_packet(data))
    }

    /// Extra RX room 0.12 ignores: the descriptors that follow, while they are device-writable
    /// and inside memory, at most `room` bytes in all (the last one cut to fit). Never fails.
    #[inline(never)]
    fn rx_extra<M, T>(
        lookup: &Lookup<'a, M, B>,
        desc_chain: &mut DescriptorChain<T>,
        mut room: u32,
    ) -> Vec<VolatileSlice<'a, B>>
    where
        M: GuestMemory,
        M::Bitmap: WithBitmapSlice<'a, S = B>,
        T: Deref,
        T::Target: GuestMemory,
    {
        let mut rest = Vec::new();
        while room > 0 {
            let Some(desc) = next_desc(desc_chain) else {
                break;
            };
            if !desc.write_only {
                break;
            }
            let take = desc.len.min(room);
            if take > 0 {
                let Ok(slice) = lookup.slice(desc.addr, take as usize) else {
                    break;
                };
                rest.push(slice);
                room -= take;
            }
            if !desc.has_next {
                break;
            }
        }
        rest
    }

    /// The rest of an RX buffer (`total` bytes so far): every descriptor after the one at
    /// `index`, which has a next descriptor; at most `max_data_size` bytes in all.
    #[inline(always)]
    fn rx_payload<M, T>(
        lookup: &Lookup<'a, M, B>,
        desc_chain: &mut DescriptorChain<T>,
        data: &mut Fragments<'a, B>,
        max_data_size: u32,
        mut total: u64,
        mut index: usize,
    ) -> Result<()>
    where
        M: GuestMemory,
        M::Bitmap: WithBitmapSlice<'a, S = B>,
        T: Deref,
        T::Target: GuestMemory,
    {
        let mut seen_data_desc = false;
        while let Some(desc) = next_desc(desc_chain) {
            index += 1;
            seen_data_desc = true;
            if !desc.write_only {
                return Err(Error::UnexpectedReadOnlyDescriptor { index });
            }
            total += u64::from(desc.len);
            if total > u64::from(max_data_size) {
                return Err(Error::DescriptorLengthTooLong {
                    max: u64::from(max_data_size),
                    found: total,
                });
            }
            if desc.len > 0 {
                data.push(lookup.slice(desc.addr, desc.len as usize)?);
            }
            if !desc.has_next {
                break;
            }
        }
        if !seen_data_desc {
            return Err(Error::DescriptorChainTooShort(
                "expected a payload descriptor after the header, found the chain's end",
            ));
        }
        Ok(())
    }
}
