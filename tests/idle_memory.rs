// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The protocol engine's own heap cost per idle connection: 10,000 connected, idle stream
//! connections between two sans-IO [`Endpoint`]s (no driver, no device: one endpoint's packets
//! are handed to the other), and the heap each endpoint holds for them, per connection.
//!
//! An endpoint owns every byte it allocates, so what it holds is what dropping it gives back:
//! the counting allocator's live bytes just before and just after the drop. The same for an
//! endpoint with nothing open (its fixed cost) is subtracted. Alone in its binary, so that its
//! counting allocator sees only this test's allocations.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use vdpa_vsock::packet::{SocketType, VMADDR_CID_HOST};
use vdpa_vsock::proto::{Config, ConnId, ConnState, Endpoint, Event};

const CONNS: usize = 10_000;
const GUEST_CID: u64 = 3;
const PORT: u32 = 1234;
/// Most heap bytes an endpoint may hold per idle connection (either side). Measured: 430
/// (guest) and 400 (host) bytes; 675 and 619 before the states carried their data (the
/// connection table holds each connection inline, about 1.6 slots per entry), the message
/// queues moved into a box, the port counts became `u32` and the event and transmit queues
/// gave back their burst.
const MAX_HEAP_PER_CONN: usize = 448;

/// The global allocator, counting the bytes in use.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call goes to `System` with the caller's own arguments, so `System`'s
// guarantees are ours; the counter is only read, never used to allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract (a non-zero-sized layout).
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller passes a block this allocator (that is, `System`) gave out, with
        // its layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller passes a block `System` gave out, its layout and a valid new
        // size.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            LIVE.fetch_add(new_size, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// The heap `ep` holds: what dropping it gives back.
fn held(ep: Endpoint) -> usize {
    let before = live();
    drop(ep);
    before - live()
}

/// Move packets both ways until both sides are quiet.
fn wire(now: Instant, a: &mut Endpoint, b: &mut Endpoint, buf: &mut [u8]) {
    loop {
        let mut moved = false;
        while let Some(h) = a.poll_transmit(now, buf) {
            b.handle_packet(now, &h, &buf[..h.len as usize]);
            moved = true;
        }
        while let Some(h) = b.poll_transmit(now, buf) {
            a.handle_packet(now, &h, &buf[..h.len as usize]);
            moved = true;
        }
        if !moved {
            return;
        }
    }
}

fn guest_and_host() -> (Endpoint, Endpoint) {
    let guest = Endpoint::new(Config {
        local_cid: GUEST_CID,
        ..Config::default()
    });
    let host = Endpoint::new(Config {
        local_cid: VMADDR_CID_HOST,
        ..Config::default()
    });
    (guest, host)
}

#[test]
fn an_idle_connection_costs_each_endpoint_little_heap() {
    let (guest, host) = guest_and_host();
    let (empty_guest, empty_host) = (held(guest), held(host));

    let now = Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    let (mut guest, mut host) = guest_and_host();
    let l = host.listen(PORT, CONNS, SocketType::Stream).unwrap();
    let mut ours = Vec::with_capacity(CONNS);
    for _ in 0..CONNS {
        ours.push(
            guest
                .connect(now, VMADDR_CID_HOST, PORT, None, SocketType::Stream)
                .unwrap(),
        );
    }
    wire(now, &mut guest, &mut host, &mut buf);
    let mut theirs: Vec<ConnId> = std::iter::from_fn(|| host.accept(l)).collect();
    assert_eq!(theirs.len(), CONNS, "every connect accepted");
    // Every event read, as an owner would: the connections are idle, nothing is owed.
    let connected = std::iter::from_fn(|| guest.poll_event())
        .filter(|e| matches!(e, Event::Connected(_)))
        .count();
    assert_eq!(connected, CONNS);
    let incoming = std::iter::from_fn(|| host.poll_event()).count();
    assert_eq!(incoming, CONNS);
    for (ep, ids) in [(&guest, &ours), (&host, &theirs)] {
        assert!(ids
            .iter()
            .all(|&c| ep.state(c) == Some(ConnState::Connected)));
        assert_eq!(ep.poll_timeout(), None, "an idle connection arms no timer");
        ep.check_invariants().unwrap();
    }
    // Idle: nothing left to send either way.
    assert!(guest.poll_transmit(now, &mut buf).is_none());
    assert!(host.poll_transmit(now, &mut buf).is_none());
    ours.clear();
    ours.shrink_to_fit();
    theirs.clear();
    theirs.shrink_to_fit();
    drop(buf);

    let per_conn = |ep: Endpoint, empty: usize| (held(ep) - empty) / CONNS;
    let guest_per_conn = per_conn(guest, empty_guest);
    let host_per_conn = per_conn(host, empty_host);
    eprintln!(
        "idle connections: {CONNS}; heap per connection: guest (connect side) \
         {guest_per_conn} B, host (accept side) {host_per_conn} B; empty endpoints: guest \
         {empty_guest} B, host {empty_host} B"
    );
    assert!(
        guest_per_conn <= MAX_HEAP_PER_CONN && host_per_conn <= MAX_HEAP_PER_CONN,
        "heap per idle connection: guest {guest_per_conn} B, host {host_per_conn} B, \
         expected at most {MAX_HEAP_PER_CONN} B each"
    );
}
