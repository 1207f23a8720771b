// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The driver view: packets over buffers the driver owns (a used RX buffer, a TX buffer being
//! filled, raw byte buffers).

use vm_memory::bitmap::{BitmapSlice, WithBitmapSlice};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions, VolatileSlice};

use super::lookup::get_single_slice;
use super::{Error, Header, Result, VsockPacket, PKT_HEADER_LEN, PKT_HEADER_SIZE};

impl<'a, B: BitmapSlice> VsockPacket<'a, B> {
    /// Driver view of a used RX buffer: the device wrote a packet into the buffer at `addr`
    /// (`capacity` bytes were posted) and reported `used_len` bytes written.
    ///
    /// Everything the device wrote is checked before use: `used_len` must cover a header and
    /// fit the posted buffer, and the header's `len` must fit in what was written. The payload is
    /// exactly `len` bytes.
    ///
    /// # Example
    ///
    /// ```
    /// use vdpa_vsock::packet::{Header, VsockPacket};
    /// use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    ///
    /// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
    /// let hdr = Header { len: 3, op: 5, type_: 1, ..Default::default() };
    /// mem.write_slice(&hdr.to_bytes(), GuestAddress(0x1000)).unwrap();
    /// mem.write_slice(b"abc", GuestAddress(0x1000 + 44)).unwrap();
    /// let pkt = VsockPacket::from_used_rx_buffer(&mem, GuestAddress(0x1000), 4096, 47).unwrap();
    /// assert_eq!(pkt.header(), hdr);
    /// // A device that claims more than it wrote is refused.
    /// assert!(VsockPacket::from_used_rx_buffer(&mem, GuestAddress(0x1000), 4096, 45).is_err());
    /// ```
    pub fn from_used_rx_buffer<M>(
        mem: &'a M,
        addr: GuestAddress,
        capacity: u32,
        used_len: u32,
    ) -> Result<Self>
    where
        M: GuestMemory,
        M::Bitmap: WithBitmapSlice<'a, S = B>,
    {
        if used_len > capacity {
            return Err(Error::DescriptorLengthTooLong {
                max: u64::from(capacity),
                found: u64::from(used_len),
            });
        }
        if (used_len as usize) < PKT_HEADER_SIZE {
            return Err(Error::DescriptorLengthTooSmall {
                expected: PKT_HEADER_SIZE as u64,
                found: u64::from(used_len),
            });
        }
        let header_slice = get_single_slice(mem, addr, PKT_HEADER_SIZE, Permissions::Read)?;
        let mut raw = [0u8; PKT_HEADER_SIZE];
        header_slice
            .read_slice(&mut raw, 0)
            .map_err(Error::InvalidVolatileAccess)?;
        let header = Header::from_bytes(&raw);
        let room = used_len - PKT_HEADER_LEN;
        if header.len > room {
            return Err(Error::InvalidHeaderLen {
                len: header.len,
                max: room,
            });
        }
        let data_slice = if header.len > 0 {
            let data_addr =
                addr.checked_add(PKT_HEADER_SIZE as u64)
                    .ok_or(Error::FragmentedMemory {
                        addr: addr.raw_value(),
                        len: used_len as usize,
                    })?;
            Some(get_single_slice(
                mem,
                data_addr,
                header.len as usize,
                Permissions::Read,
            )?)
        } else {
            None
        };
        Ok(VsockPacket {
            header_slice,
            header_rest: Vec::new(),
            header,
            data_slice,
            data_rest: Vec::new(),
            data_slice_is_ref: false,
        })
    }

    /// Driver view of a TX buffer being filled: a header at `addr` and room for up to
    /// `capacity - PKT_HEADER_SIZE` bytes of payload after it. The header starts zeroed.
    ///
    /// # Example
    ///
    /// ```
    /// use vdpa_vsock::packet::{Op, VsockPacket};
    /// use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    ///
    /// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
    /// let mut pkt = VsockPacket::from_tx_buffer(&mem, GuestAddress(0x1000), 4096).unwrap();
    /// let n = pkt.write_data(b"ping").unwrap();
    /// pkt.set_op(Op::Rw as u16).set_len(n as u32);
    /// assert_eq!(pkt.data_len(), 4096 - 44);
    /// let mut raw = [0u8; 48];
    /// mem.read_slice(&mut raw, GuestAddress(0x1000)).unwrap();
    /// assert_eq!(raw[24], 4); // len
    /// assert_eq!(&raw[44..], b"ping");
    /// // Too small for a header.
    /// assert!(VsockPacket::from_tx_buffer(&mem, GuestAddress(0x1000), 43).is_err());
    /// ```
    pub fn from_tx_buffer<M>(mem: &'a M, addr: GuestAddress, capacity: u32) -> Result<Self>
    where
        M: GuestMemory,
        M::Bitmap: WithBitmapSlice<'a, S = B>,
    {
        if (capacity as usize) < PKT_HEADER_SIZE {
            return Err(Error::DescriptorLengthTooSmall {
                expected: PKT_HEADER_SIZE as u64,
                found: u64::from(capacity),
            });
        }
        let header_slice = get_single_slice(mem, addr, PKT_HEADER_SIZE, Permissions::Write)?;
        let room = capacity as usize - PKT_HEADER_SIZE;
        let data_slice = if room > 0 {
            let data_addr =
                addr.checked_add(PKT_HEADER_SIZE as u64)
                    .ok_or(Error::FragmentedMemory {
                        addr: addr.raw_value(),
                        len: capacity as usize,
                    })?;
            Some(get_single_slice(mem, data_addr, room, Permissions::Write)?)
        } else {
            None
        };
        let mut pkt = VsockPacket {
            header_slice,
            header_rest: Vec::new(),
            header: Header::default(),
            data_slice,
            data_rest: Vec::new(),
            data_slice_is_ref: false,
        };
        pkt.set_header(&Header::default());
        Ok(pkt)
    }
}

impl<'a> VsockPacket<'a, ()> {
    /// Create a packet over one buffer for the header and an optional one for data.
    ///
    /// # Safety
    ///
    /// The caller must guarantee that the memory of `header` and `data` stays valid for the
    /// lifetime `'a` of the packet, and that every other user of that memory uses volatile
    /// accesses meanwhile.
    ///
    /// # Example
    ///
    /// ```
    /// use vdpa_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
    ///
    /// let mut raw = [0u8; PKT_HEADER_SIZE + 16];
    /// let (hdr, data) = raw.split_at_mut(PKT_HEADER_SIZE);
    /// // SAFETY: `raw` outlives the packet and is only accessed through it.
    /// let mut pkt = unsafe { VsockPacket::new(hdr, Some(data)).unwrap() };
    /// pkt.set_len(16);
    /// assert_eq!(pkt.data_slice().unwrap().len(), 16);
    /// ```
    pub unsafe fn new(header: &mut [u8], data: Option<&mut [u8]>) -> Result<VsockPacket<'a, ()>> {
        if header.len() != PKT_HEADER_SIZE {
            return Err(Error::InvalidHeaderInputSize(header.len()));
        }
        Ok(VsockPacket {
            // SAFETY: the caller guarantees the buffer outlives 'a and is accessed volatilely by
            // everyone else; its pointer and length come from a valid slice.
            header_slice: unsafe { VolatileSlice::new(header.as_mut_ptr(), PKT_HEADER_SIZE) },
            header_rest: Vec::new(),
            header: Header::default(),
            // SAFETY: as above, for the data buffer.
            data_slice: data.map(|d| unsafe { VolatileSlice::new(d.as_mut_ptr(), d.len()) }),
            data_rest: Vec::new(),
            data_slice_is_ref: false,
        })
    }
}
