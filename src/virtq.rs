//! The driver half of a split virtqueue (virtio 1.2 section 2.7).
