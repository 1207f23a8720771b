// SPDX-License-Identifier: GPL-2.0
/*
 * vdpa_sim_vsock: a virtio-vsock (device id 19) test device on the vdpa_sim framework, modelled on
 * drivers/vdpa/vdpa_sim/vdpa_sim_net.c. Built out of tree by tests/vm/run.sh next to vdpa_sim.
 *
 * Management device "vdpasim_vsock"; config guest_cid (3 unless the module parameter says
 * otherwise); queues 0 rx, 1 tx, 2 event (the driver's posted event buffers stay posted until
 * an event is sent: see transport_reset below).
 * The host side (CID 2) lives in the work function: it accepts up to MAX_CONNS stream connections
 * on port 1234 and echoes RW payload; REQUEST -> RESPONSE (RST for other ports, and when all
 * MAX_CONNS are in use), CREDIT_REQUEST -> CREDIT_UPDATE; credit per virtio 1.2 section 5.10.6.3
 * (buf_alloc/fwd_cnt). SHUTDOWN as Linux's net/vmw_vsock/virtio_transport_common.c does it:
 * - SEND only (the guest half-closed): every byte received before is still echoed; then the host
 *   finishes too, sending SHUTDOWN(RCV|SEND), and waits for the guest's RST (a guest SHUTDOWN
 *   with both bits is answered with RST, as Linux does when the peer closed both ways).
 * - both bits (the guest closed): nothing more is echoed; RST, and the connection is gone.
 * - RCV only: what was buffered for the guest is dropped (it will not read it).
 *
 * guest_cid change at run time (a config interrupt): writing
 * /sys/module/vdpa_sim_vsock/parameters/guest_cid changes guest_cid of every device, drops the
 * host side's connections (they belonged to the old CID; the driver resets its own) and fires the
 * config callback the driver registered (VHOST_VDPA_SET_CONFIG_CALL). Stock vdpa_sim ignores
 * set_config_cb; tests/vm/run.sh patches it (vdpa_sim-config-cb.patch) to store the callback and
 * export vdpasim_config_changed().
 *
 * Lifecycle knobs for the driver's recovery tests (write-only module parameters, write 1):
 * - transport_reset: every running device (DRIVER_OK) drops its host side's connections without
 *   a word and puts one struct virtio_vsock_event { id = VIRTIO_VSOCK_EVENT_TRANSPORT_RESET }
 *   into a buffer the driver posted on the event queue (used length 4) and interrupts that queue,
 *   as QEMU's vhost-vsock does after a migration. The work function does it (it is the one with
 *   the owner's mm for the rings). Read-only counters: transport_resets_sent, and
 *   transport_resets_dropped for an event that found no posted buffer (or no event queue, or a
 *   device not running); each drop is logged.
 * - migrate_guest_cid (write a CID): as transport_reset, but every device first takes that CID
 *   as guest_cid without a config interrupt (the guest_cid parameter then reads it too): a
 *   migration to a host that gives the guest another CID, after which the driver must re-read
 *   guest_cid on the event (as Linux's virtio_transport does).
 * - needs_reset: every running device sets VIRTIO_CONFIG_S_NEEDS_RESET in its status, stops
 *   processing its queues, drops its host side's connections and raises the config interrupt.
 *   A reset by the driver (status 0, which clears the status) ends it; after a new bring-up the
 *   device works again. Read-only counter: needs_reset_raised (devices that got the bit).
 */

#include <linux/atomic.h>
#include <linux/init.h>
#include <linux/list.h>
#include <linux/moduleparam.h>
#include <linux/mutex.h>
#include <linux/string.h>
#include <linux/module.h>
#include <linux/device.h>
#include <linux/kernel.h>
#include <linux/slab.h>
#include <linux/vringh.h>
#include <linux/vdpa.h>
#include <uapi/linux/virtio_ids.h>
#include <uapi/linux/virtio_vsock.h>

#include "vdpa_sim.h"

#define VDPASIM_VSOCK_VQ_NUM 3
#define EVENT_VQ 2
#define DEFAULT_GUEST_CID 3
#define HOST_CID 2
#define ECHO_PORT 1234
#define HOST_BUF_ALLOC (64 * 1024)
/* Enough for the 50-connection VM test with room to spare; REQUEST beyond it gets RST. */
#define MAX_CONNS 128
#define MAX_PENDING_RST 16
#define HDR_LEN sizeof(struct virtio_vsock_hdr)

struct vconn {
	bool used;
	u32 guest_port;
	u32 host_port;
	u32 peer_buf_alloc;
	u32 peer_fwd_cnt;
	u32 tx_cnt;	/* bytes we sent to the guest */
	u32 fwd_cnt;	/* bytes of ours consumed (echoed back) */
	bool need_response, need_credit_update, need_rst;
	bool peer_no_more_tx;	/* the guest sent SHUTDOWN with SEND: it sends nothing more */
	bool peer_no_more_rx;	/* the guest sent SHUTDOWN with RCV: it reads nothing more */
	bool shut_sent;		/* our SHUTDOWN(RCV|SEND) went out: waiting for the guest's RST */
	u8 *buf;	/* ring of HOST_BUF_ALLOC bytes */
	u32 head, len;
};

struct pending_rst {
	u32 src_port, dst_port; /* from the host's point of view: src = host port */
};

struct vdpasim_vsock {
	struct vdpasim vdpasim;
	struct list_head node;	/* in vsock_devs, for the guest_cid parameter */
	u64 guest_cid;		/* written under vdpasim.mutex (WRITE_ONCE); get_config reads it without */
	u8 *pkt;	/* HDR_LEN + HOST_BUF_ALLOC scratch */
	struct vconn conns[MAX_CONNS];
	struct pending_rst rsts[MAX_PENDING_RST];
	int nrst;
	bool event_pending;	/* a TRANSPORT_RESET for the work function to send (under mutex) */
};

/* Every device, so that a guest_cid change reaches them all. */
static LIST_HEAD(vsock_devs);
static DEFINE_MUTEX(vsock_devs_lock);
static u64 guest_cid_param = DEFAULT_GUEST_CID;	/* under vsock_devs_lock */
/* Counters behind the read-only parameters of the same names (every device together). */
static atomic_t transport_resets_sent = ATOMIC_INIT(0);
static atomic_t transport_resets_dropped = ATOMIC_INIT(0);
static atomic_t needs_reset_raised = ATOMIC_INIT(0);

static struct vdpasim_vsock *sim_to_vsock(struct vdpasim *vdpasim)
{
	return container_of(vdpasim, struct vdpasim_vsock, vdpasim);
}

static void vq_complete(struct vdpasim_virtqueue *vq, size_t len)
{
	/* The bytes written into the buffer before its used entry (virtio 1.2 section 2.7.8). */
	smp_wmb();
	vringh_complete_iotlb(&vq->vring, vq->head, len);
	/* The used entry visible before the interrupt is raised (as vdpa_sim_net does). */
	smp_wmb();
	local_bh_disable();
	if (vringh_need_notify_iotlb(&vq->vring) > 0)
		vringh_notify(&vq->vring);
	local_bh_enable();
}

static struct vconn *find_conn(struct vdpasim_vsock *v, u32 guest_port, u32 host_port)
{
	int i;

	for (i = 0; i < MAX_CONNS; i++)
		if (v->conns[i].used && v->conns[i].guest_port == guest_port &&
		    v->conns[i].host_port == host_port)
			return &v->conns[i];
	return NULL;
}

static void free_conn(struct vconn *c)
{
	kvfree(c->buf);
	memset(c, 0, sizeof(*c));
}

static void free_all_conns(struct vdpasim_vsock *v)
{
	int i;

	for (i = 0; i < MAX_CONNS; i++)
		if (v->conns[i].used)
			free_conn(&v->conns[i]);
	v->nrst = 0;
}

static void queue_rst(struct vdpasim_vsock *v, u32 host_port, u32 guest_port)
{
	if (v->nrst < MAX_PENDING_RST) {
		v->rsts[v->nrst].src_port = host_port;
		v->rsts[v->nrst].dst_port = guest_port;
		v->nrst++;
	}
}

/* Appends len bytes (len <= HOST_BUF_ALLOC - c->len, checked by the caller) to the ring. */
static void ring_put(struct vconn *c, const u8 *data, u32 len)
{
	u32 tail = (c->head + c->len) % HOST_BUF_ALLOC;
	u32 first = min_t(u32, len, HOST_BUF_ALLOC - tail);

	memcpy(c->buf + tail, data, first);
	memcpy(c->buf, data + first, len - first);
	c->len += len;
}

/* Takes len bytes (len <= c->len) from the ring into out. */
static void ring_take(struct vconn *c, u8 *out, u32 len)
{
	u32 first = min_t(u32, len, HOST_BUF_ALLOC - c->head);

	memcpy(out, c->buf + c->head, first);
	memcpy(out + first, c->buf, len - first);
	c->head = (c->head + len) % HOST_BUF_ALLOC;
	c->len -= len;
}

/* One packet from the guest (tx queue); replies are queued on the connection or in rsts[]. */
static void handle_tx_pkt(struct vdpasim_vsock *v, struct virtio_vsock_hdr *h, u8 *data, u32 len)
{
	u16 op = le16_to_cpu(h->op);
	u32 sport = le32_to_cpu(h->src_port), dport = le32_to_cpu(h->dst_port);
	struct vconn *c;
	int i;

	if (le16_to_cpu(h->type) != VIRTIO_VSOCK_TYPE_STREAM ||
	    le64_to_cpu(h->dst_cid) != HOST_CID || le64_to_cpu(h->src_cid) != v->guest_cid) {
		if (op != VIRTIO_VSOCK_OP_RST)
			queue_rst(v, dport, sport);
		return;
	}
	c = find_conn(v, sport, dport);
	if (c) {
		c->peer_buf_alloc = le32_to_cpu(h->buf_alloc);
		c->peer_fwd_cnt = le32_to_cpu(h->fwd_cnt);
	}
	switch (op) {
	case VIRTIO_VSOCK_OP_REQUEST:
		if (c || dport != ECHO_PORT) {
			queue_rst(v, dport, sport);
			return;
		}
		for (i = 0; i < MAX_CONNS && v->conns[i].used; i++)
			;
		if (i == MAX_CONNS) {
			pr_warn_ratelimited("vdpa_sim_vsock: all %d connections in use: RST to port %u\n",
					    MAX_CONNS, sport);
			queue_rst(v, dport, sport);
			return;
		}
		c = &v->conns[i];
		c->buf = kvmalloc(HOST_BUF_ALLOC, GFP_KERNEL);
		if (!c->buf) {
			queue_rst(v, dport, sport);
			return;
		}
		c->used = true;
		c->guest_port = sport;
		c->host_port = dport;
		c->peer_buf_alloc = le32_to_cpu(h->buf_alloc);
		c->peer_fwd_cnt = le32_to_cpu(h->fwd_cnt);
		c->need_response = true;
		return;
	case VIRTIO_VSOCK_OP_RW:
		if (!c) {
			queue_rst(v, dport, sport);
			return;
		}
		if (len > HOST_BUF_ALLOC - c->len || c->peer_no_more_tx) {
			/* The guest broke our credit, or sent after SHUTDOWN(SEND): reset. */
			c->need_rst = true;
			return;
		}
		if (c->peer_no_more_rx) {
			/* Nobody reads the echo: the bytes are consumed here. */
			c->fwd_cnt += len;
			c->need_credit_update = true;
			return;
		}
		ring_put(c, data, len);
		return;
	case VIRTIO_VSOCK_OP_SHUTDOWN: {
		u32 flags = le32_to_cpu(h->flags);

		if (!c) {
			queue_rst(v, dport, sport);
			return;
		}
		if (flags & VIRTIO_VSOCK_SHUTDOWN_RCV) {
			/* The guest reads nothing more: what we hold for it is consumed unsent. */
			c->peer_no_more_rx = true;
			c->fwd_cnt += c->len;
			c->head = 0;
			c->len = 0;
		}
		if (flags & VIRTIO_VSOCK_SHUTDOWN_SEND)
			c->peer_no_more_tx = true;
		/* Both directions closed by the guest (in one SHUTDOWN or two): RST, as Linux does
		 * when the peer's shutdown is complete and no data is left to deliver.
		 */
		if (c->peer_no_more_rx && c->peer_no_more_tx)
			c->need_rst = true;
		return;
	}
	case VIRTIO_VSOCK_OP_CREDIT_REQUEST:
		if (c)
			c->need_credit_update = true;
		else
			queue_rst(v, dport, sport);
		return;
	case VIRTIO_VSOCK_OP_CREDIT_UPDATE:
	case VIRTIO_VSOCK_OP_RESPONSE:
		return;
	case VIRTIO_VSOCK_OP_RST:
		if (c)
			free_conn(c);
		return;
	default:
		queue_rst(v, dport, sport);
	}
}

static size_t iov_space(struct vringh_kiov *iov)
{
	size_t n = 0;
	unsigned int k;

	for (k = iov->i; k < iov->used; k++)
		n += iov->iov[k].iov_len;
	return n - iov->consumed;
}

/* Sends one packet to the guest; false when no rx buffer is available. */
static bool send_pkt(struct vdpasim *vdpasim, u16 op, u32 flags, u32 sport, u32 dport,
		     struct vconn *c, u32 want_data, u32 *sent)
{
	struct vdpasim_vsock *v = sim_to_vsock(vdpasim);
	struct vdpasim_virtqueue *rxq = &vdpasim->vqs[0];
	struct virtio_vsock_hdr *h = (struct virtio_vsock_hdr *)v->pkt;
	size_t room;
	u32 n = 0;
	int err;

	err = vringh_getdesc_iotlb(&rxq->vring, NULL, &rxq->in_iov, &rxq->head, GFP_ATOMIC);
	if (err <= 0)
		return false;
	room = iov_space(&rxq->in_iov);
	if (room < HDR_LEN) {
		vq_complete(rxq, 0);
		return true;
	}
	if (want_data) {
		n = min_t(u32, want_data, min_t(size_t, room - HDR_LEN, HOST_BUF_ALLOC));
		ring_take(c, v->pkt + HDR_LEN, n);
		c->fwd_cnt += n;
		c->tx_cnt += n;
	}
	memset(h, 0, HDR_LEN);
	h->src_cid = cpu_to_le64(HOST_CID);
	h->dst_cid = cpu_to_le64(v->guest_cid);
	h->src_port = cpu_to_le32(sport);
	h->dst_port = cpu_to_le32(dport);
	h->len = cpu_to_le32(n);
	h->type = cpu_to_le16(VIRTIO_VSOCK_TYPE_STREAM);
	h->op = cpu_to_le16(op);
	h->flags = cpu_to_le32(flags);
	h->buf_alloc = cpu_to_le32(c ? HOST_BUF_ALLOC : 0);
	h->fwd_cnt = cpu_to_le32(c ? c->fwd_cnt : 0);
	err = vringh_iov_push_iotlb(&rxq->vring, &rxq->in_iov, v->pkt, HDR_LEN + n);
	vq_complete(rxq, err > 0 ? err : 0);
	if (sent)
		*sent = n;
	return true;
}

/* Host-to-guest work; returns true if anything was sent. */
static bool pump_rx(struct vdpasim *vdpasim, bool *starved)
{
	struct vdpasim_vsock *v = sim_to_vsock(vdpasim);
	bool progress = false;
	int i;

	while (v->nrst > 0) {
		struct pending_rst *r = &v->rsts[v->nrst - 1];

		if (!send_pkt(vdpasim, VIRTIO_VSOCK_OP_RST, 0, r->src_port, r->dst_port, NULL, 0,
			      NULL))
			goto starved;
		v->nrst--;
		progress = true;
	}
	for (i = 0; i < MAX_CONNS; i++) {
		struct vconn *c = &v->conns[i];
		u32 credit, sent;

		if (!c->used)
			continue;
		if (c->need_rst) {
			if (!send_pkt(vdpasim, VIRTIO_VSOCK_OP_RST, 0, c->host_port, c->guest_port,
				      NULL, 0, NULL))
				goto starved;
			free_conn(c);
			progress = true;
			continue;
		}
		if (c->need_response) {
			if (!send_pkt(vdpasim, VIRTIO_VSOCK_OP_RESPONSE, 0, c->host_port,
				      c->guest_port, c, 0, NULL))
				goto starved;
			c->need_response = false;
			progress = true;
		}
		while (c->len > 0) {
			credit = c->peer_buf_alloc - (c->tx_cnt - c->peer_fwd_cnt);
			if (credit == 0 || credit > c->peer_buf_alloc)
				break;
			if (!send_pkt(vdpasim, VIRTIO_VSOCK_OP_RW, 0, c->host_port, c->guest_port, c,
				      min(c->len, credit), &sent))
				goto starved;
			c->need_credit_update = false; /* the RW header carries our credit */
			progress = true;
		}
		if (c->need_credit_update) {
			if (!send_pkt(vdpasim, VIRTIO_VSOCK_OP_CREDIT_UPDATE, 0, c->host_port,
				      c->guest_port, c, 0, NULL))
				goto starved;
			c->need_credit_update = false;
			progress = true;
		}
		/* Half-closed by the guest and everything echoed: the host finishes as well. */
		if (c->peer_no_more_tx && c->len == 0 && !c->shut_sent) {
			if (!send_pkt(vdpasim, VIRTIO_VSOCK_OP_SHUTDOWN,
				      VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND,
				      c->host_port, c->guest_port, c, 0, NULL))
				goto starved;
			c->shut_sent = true;
			progress = true;
		}
	}
	return progress;
starved:
	*starved = true;
	return progress;
}

static void drop_event(struct vdpasim *vdpasim, const char *why)
{
	atomic_inc(&transport_resets_dropped);
	pr_warn_ratelimited("vdpa_sim_vsock: %s: TRANSPORT_RESET not delivered: %s\n",
			    dev_name(&vdpasim->vdpa.dev), why);
}

/*
 * The pending TRANSPORT_RESET (virtio 1.2 section 5.10.6.5) into one buffer the driver posted on
 * the event queue: used length 4, then the event queue's interrupt. Under vdpasim->mutex, from the
 * work function.
 */
static void send_transport_reset(struct vdpasim *vdpasim)
{
	struct vdpasim_virtqueue *evq = &vdpasim->vqs[EVENT_VQ];
	struct virtio_vsock_event ev = {
		.id = cpu_to_le32(VIRTIO_VSOCK_EVENT_TRANSPORT_RESET),
	};
	ssize_t n;
	int err;

	sim_to_vsock(vdpasim)->event_pending = false;
	if (!evq->ready) {
		drop_event(vdpasim, "the event queue is not set up");
		return;
	}
	err = vringh_getdesc_iotlb(&evq->vring, NULL, &evq->in_iov, &evq->head, GFP_ATOMIC);
	if (err < 0) {
		drop_event(vdpasim, "the event queue's next buffer is malformed");
		return;
	}
	if (err == 0) {
		drop_event(vdpasim, "no event buffer posted");
		return;
	}
	if (iov_space(&evq->in_iov) < sizeof(ev)) {
		vq_complete(evq, 0);
		drop_event(vdpasim, "the posted event buffer is shorter than 4 bytes");
		return;
	}
	n = vringh_iov_push_iotlb(&evq->vring, &evq->in_iov, &ev, sizeof(ev));
	vq_complete(evq, n == sizeof(ev) ? sizeof(ev) : 0);
	if (n != sizeof(ev)) {
		drop_event(vdpasim, "writing the event buffer failed");
		return;
	}
	atomic_inc(&transport_resets_sent);
}

static void vdpasim_vsock_work(struct vdpasim *vdpasim)
{
	struct vdpasim_vsock *v = sim_to_vsock(vdpasim);
	struct vdpasim_virtqueue *txq = &vdpasim->vqs[1];
	struct vdpasim_virtqueue *rxq = &vdpasim->vqs[0];
	int rounds = 0, err;
	ssize_t read;

	mutex_lock(&vdpasim->mutex);
	if (!vdpasim->running || !(vdpasim->status & VIRTIO_CONFIG_S_DRIVER_OK)) {
		free_all_conns(v);
		if (v->event_pending) {
			v->event_pending = false;
			drop_event(vdpasim, "the device was stopped first");
		}
		goto out;
	}
	/* needs_reset: nothing more is processed until the driver resets the device. */
	if (vdpasim->status & VIRTIO_CONFIG_S_NEEDS_RESET)
		goto out;
	if (v->event_pending)
		send_transport_reset(vdpasim);
	if (!txq->ready || !rxq->ready)
		goto out;

	while (rounds++ < 64) {
		bool progress = false, starved = false;

		/* Guest to host: only while nothing is owed to the guest that we cannot send. */
		while (v->nrst < MAX_PENDING_RST) {
			err = vringh_getdesc_iotlb(&txq->vring, &txq->out_iov, NULL, &txq->head,
						   GFP_ATOMIC);
			if (err <= 0)
				break;
			read = vringh_iov_pull_iotlb(&txq->vring, &txq->out_iov, v->pkt,
						     HDR_LEN + HOST_BUF_ALLOC);
			if (read >= (ssize_t)HDR_LEN) {
				struct virtio_vsock_hdr *h = (struct virtio_vsock_hdr *)v->pkt;
				u32 len = min_t(u32, le32_to_cpu(h->len), read - HDR_LEN);

				handle_tx_pkt(v, h, v->pkt + HDR_LEN, len);
			}
			vq_complete(txq, 0);
			progress = true;
		}
		if (pump_rx(vdpasim, &starved))
			progress = true;
		if (!progress)
			break;
	}
	if (rounds > 64)
		vdpasim_schedule_work(vdpasim);
out:
	mutex_unlock(&vdpasim->mutex);
}

/* Called by vdpa_sim without vdpasim->mutex (VHOST_VDPA_GET_CONFIG): READ_ONCE. */
static void vdpasim_vsock_get_config(struct vdpasim *vdpasim, void *config)
{
	struct virtio_vsock_config *c = config;

	c->guest_cid = cpu_to_le64(READ_ONCE(sim_to_vsock(vdpasim)->guest_cid));
}

static void vdpasim_vsock_free(struct vdpasim *vdpasim)
{
	struct vdpasim_vsock *v = sim_to_vsock(vdpasim);

	free_all_conns(v);
	kvfree(v->pkt);
}

/*
 * guest_cid parameter: a new CID for every device, as a migration would bring. The host side's
 * connections belonged to the old CID: they are dropped without a word (the driver resets its
 * own when it sees the new CID). Then the config interrupt fires.
 */
static int guest_cid_set(const char *val, const struct kernel_param *kp)
{
	struct vdpasim_vsock *v;
	u64 cid;
	int ret;

	ret = kstrtou64(val, 0, &cid);
	if (ret)
		return ret;
	/* 0, 1 and 2 are reserved (hypervisor, local, host); 2^32 - 1 is VMADDR_CID_ANY. */
	if (cid <= HOST_CID || cid >= U32_MAX)
		return -EINVAL;
	mutex_lock(&vsock_devs_lock);
	guest_cid_param = cid;
	list_for_each_entry(v, &vsock_devs, node) {
		bool changed;

		mutex_lock(&v->vdpasim.mutex);
		changed = v->guest_cid != cid;
		if (changed) {
			WRITE_ONCE(v->guest_cid, cid);
			free_all_conns(v);
		}
		mutex_unlock(&v->vdpasim.mutex);
		if (changed)
			vdpasim_config_changed(&v->vdpasim);
	}
	mutex_unlock(&vsock_devs_lock);
	return 0;
}

static int guest_cid_get(char *buf, const struct kernel_param *kp)
{
	u64 cid;

	mutex_lock(&vsock_devs_lock);
	cid = guest_cid_param;
	mutex_unlock(&vsock_devs_lock);
	return sysfs_emit(buf, "%llu\n", cid);
}

static const struct kernel_param_ops guest_cid_ops = {
	.set = guest_cid_set,
	.get = guest_cid_get,
};
module_param_cb(guest_cid, &guest_cid_ops, NULL, 0644);
MODULE_PARM_DESC(guest_cid, "guest_cid of every vdpasim_vsock device (default 3); writing it changes the CID of existing devices and fires their config interrupt");

/* The write-only parameters take exactly 1 ("1\n" from echo). */
static int parse_one(const char *val)
{
	unsigned int x;
	int ret;

	ret = kstrtouint(val, 0, &x);
	if (ret)
		return ret;
	return x == 1 ? 0 : -EINVAL;
}

/*
 * transport_reset: every running device drops its host side's connections (the driver resets
 * its own when the event arrives) and its work function sends one TRANSPORT_RESET event.
 */
/*
 * Every running device drops its host side's connections and queues a TRANSPORT_RESET for its
 * work function; with new_cid (not 0) each device first takes guest_cid new_cid without a config
 * interrupt, as after a migration. Under vsock_devs_lock.
 */
static void transport_reset_all(u64 new_cid)
{
	struct vdpasim_vsock *v;

	list_for_each_entry(v, &vsock_devs, node) {
		bool running;

		mutex_lock(&v->vdpasim.mutex);
		running = v->vdpasim.running && (v->vdpasim.status & VIRTIO_CONFIG_S_DRIVER_OK);
		if (new_cid)
			WRITE_ONCE(v->guest_cid, new_cid);
		if (running) {
			free_all_conns(v);
			v->event_pending = true;
		}
		mutex_unlock(&v->vdpasim.mutex);
		if (running)
			vdpasim_schedule_work(&v->vdpasim);
		else
			drop_event(&v->vdpasim, "the device is not running (no DRIVER_OK)");
	}
}

static int transport_reset_set(const char *val, const struct kernel_param *kp)
{
	int ret;

	ret = parse_one(val);
	if (ret)
		return ret;
	mutex_lock(&vsock_devs_lock);
	transport_reset_all(0);
	mutex_unlock(&vsock_devs_lock);
	return 0;
}

static const struct kernel_param_ops transport_reset_ops = {
	.set = transport_reset_set,
};
module_param_cb(transport_reset, &transport_reset_ops, NULL, 0200);
MODULE_PARM_DESC(transport_reset, "write 1: every running device drops its connections and sends VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on its event queue");

/*
 * migrate_guest_cid: what the driver sees after a migration to a host that gives it another CID
 * (QEMU's vhost-vsock post_load): every device takes guest_cid N without a config interrupt
 * (guest_cid reads N afterwards, and new devices get it), and the running ones drop their
 * connections and send TRANSPORT_RESET, on which the driver must re-read guest_cid.
 */
static int migrate_guest_cid_set(const char *val, const struct kernel_param *kp)
{
	u64 cid;
	int ret;

	ret = kstrtou64(val, 0, &cid);
	if (ret)
		return ret;
	if (cid <= HOST_CID || cid >= U32_MAX)
		return -EINVAL;
	mutex_lock(&vsock_devs_lock);
	guest_cid_param = cid;
	transport_reset_all(cid);
	mutex_unlock(&vsock_devs_lock);
	return 0;
}

static const struct kernel_param_ops migrate_guest_cid_ops = {
	.set = migrate_guest_cid_set,
};
module_param_cb(migrate_guest_cid, &migrate_guest_cid_ops, NULL, 0200);
MODULE_PARM_DESC(migrate_guest_cid, "write a CID: every device takes it as guest_cid without a config interrupt, and the running ones drop their connections and send TRANSPORT_RESET (a migration)");

/*
 * needs_reset: every running device enters the error state of virtio 1.2 section 2.1.2: it sets
 * NEEDS_RESET, stops processing its queues (the work function checks the bit), drops its host
 * side's connections and raises the config interrupt. The driver's reset (status 0) clears it.
 */
static int needs_reset_set(const char *val, const struct kernel_param *kp)
{
	struct vdpasim_vsock *v;
	int ret;

	ret = parse_one(val);
	if (ret)
		return ret;
	mutex_lock(&vsock_devs_lock);
	list_for_each_entry(v, &vsock_devs, node) {
		bool raised;

		mutex_lock(&v->vdpasim.mutex);
		raised = v->vdpasim.status & VIRTIO_CONFIG_S_DRIVER_OK;
		if (raised) {
			v->vdpasim.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
			free_all_conns(v);
			v->event_pending = false;
		}
		mutex_unlock(&v->vdpasim.mutex);
		if (raised) {
			atomic_inc(&needs_reset_raised);
			pr_info("vdpa_sim_vsock: %s: NEEDS_RESET set\n",
				dev_name(&v->vdpasim.vdpa.dev));
			vdpasim_config_changed(&v->vdpasim);
		}
	}
	mutex_unlock(&vsock_devs_lock);
	return 0;
}

static const struct kernel_param_ops needs_reset_ops = {
	.set = needs_reset_set,
};
module_param_cb(needs_reset, &needs_reset_ops, NULL, 0200);
MODULE_PARM_DESC(needs_reset, "write 1: every running device sets NEEDS_RESET, stops its queues, drops its connections and raises the config interrupt");

static int counter_get(char *buf, const struct kernel_param *kp)
{
	return sysfs_emit(buf, "%d\n", atomic_read((atomic_t *)kp->arg));
}

static const struct kernel_param_ops counter_ops = {
	.get = counter_get,
};
module_param_cb(transport_resets_sent, &counter_ops, &transport_resets_sent, 0444);
MODULE_PARM_DESC(transport_resets_sent, "TRANSPORT_RESET events put into a posted event buffer");
module_param_cb(transport_resets_dropped, &counter_ops, &transport_resets_dropped, 0444);
MODULE_PARM_DESC(transport_resets_dropped, "TRANSPORT_RESET events not delivered (no posted event buffer, no event queue, device not running)");
module_param_cb(needs_reset_raised, &counter_ops, &needs_reset_raised, 0444);
MODULE_PARM_DESC(needs_reset_raised, "devices that set NEEDS_RESET through the needs_reset parameter");

static void vdpasim_vsock_mgmtdev_release(struct device *dev)
{
}

static struct device vdpasim_vsock_mgmtdev = {
	.init_name = "vdpasim_vsock",
	.release = vdpasim_vsock_mgmtdev_release,
};

static int vdpasim_vsock_dev_add(struct vdpa_mgmt_dev *mdev, const char *name,
				 const struct vdpa_dev_set_config *config)
{
	struct vdpasim_dev_attr dev_attr = {};
	struct vdpasim_vsock *v;
	struct vdpasim *simdev;
	int ret;

	dev_attr.mgmt_dev = mdev;
	dev_attr.name = name;
	dev_attr.id = VIRTIO_ID_VSOCK;
	dev_attr.supported_features = VDPASIM_FEATURES;
	dev_attr.nvqs = VDPASIM_VSOCK_VQ_NUM;
	dev_attr.ngroups = 2; /* vdpa_sim puts queue 2 in group 1 */
	dev_attr.nas = 1;
	dev_attr.alloc_size = sizeof(struct vdpasim_vsock);
	dev_attr.config_size = sizeof(struct virtio_vsock_config);
	dev_attr.get_config = vdpasim_vsock_get_config;
	dev_attr.work_fn = vdpasim_vsock_work;
	dev_attr.free = vdpasim_vsock_free;

	simdev = vdpasim_create(&dev_attr, config);
	if (IS_ERR(simdev))
		return PTR_ERR(simdev);

	v = sim_to_vsock(simdev);
	INIT_LIST_HEAD(&v->node);
	v->pkt = kvmalloc(HDR_LEN + HOST_BUF_ALLOC, GFP_KERNEL);
	if (!v->pkt) {
		ret = -ENOMEM;
		goto reg_err;
	}
	mutex_lock(&vsock_devs_lock);
	v->guest_cid = guest_cid_param;
	list_add(&v->node, &vsock_devs);
	mutex_unlock(&vsock_devs_lock);
	ret = _vdpa_register_device(&simdev->vdpa, VDPASIM_VSOCK_VQ_NUM);
	if (ret)
		goto list_err;
	return 0;

list_err:
	mutex_lock(&vsock_devs_lock);
	list_del(&v->node);
	mutex_unlock(&vsock_devs_lock);

reg_err:
	put_device(&simdev->vdpa.dev);
	return ret;
}

static void vdpasim_vsock_dev_del(struct vdpa_mgmt_dev *mdev, struct vdpa_device *dev)
{
	struct vdpasim *simdev = container_of(dev, struct vdpasim, vdpa);
	struct vdpasim_vsock *v = sim_to_vsock(simdev);

	mutex_lock(&vsock_devs_lock);
	list_del(&v->node);
	mutex_unlock(&vsock_devs_lock);
	_vdpa_unregister_device(&simdev->vdpa);
}

static const struct vdpa_mgmtdev_ops vdpasim_vsock_mgmtdev_ops = {
	.dev_add = vdpasim_vsock_dev_add,
	.dev_del = vdpasim_vsock_dev_del,
};

static struct virtio_device_id id_table[] = {
	{ VIRTIO_ID_VSOCK, VIRTIO_DEV_ANY_ID },
	{ 0 },
};

static struct vdpa_mgmt_dev mgmt_dev = {
	.device = &vdpasim_vsock_mgmtdev,
	.id_table = id_table,
	.ops = &vdpasim_vsock_mgmtdev_ops,
	.max_supported_vqs = VDPASIM_VSOCK_VQ_NUM,
	.supported_features = VDPASIM_FEATURES,
};

static int __init vdpasim_vsock_init(void)
{
	int ret;

	ret = device_register(&vdpasim_vsock_mgmtdev);
	if (ret) {
		put_device(&vdpasim_vsock_mgmtdev);
		return ret;
	}
	ret = vdpa_mgmtdev_register(&mgmt_dev);
	if (ret) {
		device_unregister(&vdpasim_vsock_mgmtdev);
		return ret;
	}
	return 0;
}

static void __exit vdpasim_vsock_exit(void)
{
	vdpa_mgmtdev_unregister(&mgmt_dev);
	device_unregister(&vdpasim_vsock_mgmtdev);
}

module_init(vdpasim_vsock_init);
module_exit(vdpasim_vsock_exit);

MODULE_LICENSE("GPL v2");
MODULE_DESCRIPTION("vDPA device simulator for virtio-vsock (test device)");
