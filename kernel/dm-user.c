// SPDX-License-Identifier: GPL-2.0
/*
 * dm-user: a device-mapper target that forwards every bio to a userspace
 * daemon through a misc character device, /dev/dm-user/<name>.
 *
 * Copyright (C) 2026 The snapuserd-rs authors.
 *
 * The wire format lives in include/uapi/linux/dm-user.h and the protocol is
 * described in Documentation/dm-user.rst.  The ABI is that of the dm-user
 * target of the Android Common Kernel.
 *
 * Lock order, outermost first:
 *   dm_user_names_lock (ctr/dtr, around misc_register/misc_deregister)
 *     -> misc core lock (held by the misc core around our open())
 *   dm_user_channel.lock (mutex; read, write)
 *     -> dm_user_target.lock (spinlock, irq-safe; also taken by map(),
 *        open(), release(), the timeout work and dtr)
 * map() only ever takes the target's spinlock, so the I/O path never
 * sleeps and never allocates: the message travelling to the daemon is the
 * bio's per-bio data.  Bios are completed with no lock held.
 */

#include <linux/device-mapper.h>
#include <linux/dm-user.h>
#include <linux/fs.h>
#include <linux/highmem.h>
#include <linux/kref.h>
#include <linux/miscdevice.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/poll.h>
#include <linux/sizes.h>
#include <linux/slab.h>
#include <linux/uio.h>
#include <linux/wait.h>
#include <linux/workqueue.h>

#define DM_MSG_PREFIX "user"

/* READ and WRITE requests never exceed, or cross a multiple of, 1 MiB. */
#define DM_USER_MAX_IO_SECTORS (SZ_1M >> SECTOR_SHIFT)

static unsigned int dm_user_daemon_timeout_msec = 4000;
module_param(dm_user_daemon_timeout_msec, uint, 0644);
MODULE_PARM_DESC(dm_user_daemon_timeout_msec,
		 "msec a request waits for a daemon before any has opened the device, or during a flushing suspend");

/* What a suspend in progress does to requests no channel has taken. */
enum dm_user_suspend {
	DM_USER_RUNNING,	/* not suspending: requests wait for a channel */
	DM_USER_SUSPEND_REQUEUE, /* noflush: device-mapper holds them */
	DM_USER_SUSPEND_FLUSH,	/* flush: they fail after the daemon timeout */
};

/* Serialises name checks and misc device (de)registration. */
static DEFINE_MUTEX(dm_user_names_lock);
static LIST_HEAD(dm_user_targets);

/**
 * struct dm_user_target - one "user" target and its control device
 * @kref: one reference held by device-mapper (dropped in dtr) plus one per
 *	open channel; the last one frees the structure
 * @lock: protects @queue, @nr_queued, @next_seq, @nr_channels,
 *	@daemon_seen, @suspend and @destroyed
 * @queue: messages not yet taken by any channel, oldest first
 * @nr_queued: number of messages on @queue
 * @nr_in_flight: messages taken by a channel and not yet completed
 * @wq: readers and pollers of all channels wait here
 * @next_seq: sequence number of the next message
 * @nr_channels: number of open channels
 * @daemon_seen: a channel has been opened at least once
 * @suspend: what a suspend in progress does to queued messages
 * @destroyed: the target is gone; channels get -ENOTBLK
 * @timeout_work: fails queued messages when no daemon showed up in time
 * @node: entry in dm_user_targets
 * @start: first constructor argument, only echoed in the table status
 * @len: second constructor argument, only echoed in the table status
 * @miscdev: the control device, named "dm-user/<name>"
 */
struct dm_user_target {
	struct kref kref;
	spinlock_t lock; /* see the kernel-doc above */
	struct list_head queue;
	unsigned int nr_queued;
	atomic_t nr_in_flight;
	wait_queue_head_t wq;
	u64 next_seq;
	unsigned int nr_channels;
	bool daemon_seen;
	enum dm_user_suspend suspend;
	bool destroyed;
	struct delayed_work timeout_work;
	struct list_head node;
	sector_t start;
	sector_t len;
	struct miscdevice miscdev;
};

/**
 * struct dm_user_msg - a bio on its way to the daemon, kept in per-bio data
 * @list: entry in the target's queue or in a channel's awaiting list
 * @bio: the bio being served
 * @hdr: the request header as the daemon reads it
 * @iter: progress through the bio's data (WRITE: to the daemon, READ: from
 *	it); bi_size is 0 for requests without payload
 * @deadline: jiffies after which the message fails if no channel takes it
 *	while the timeout applies (no daemon yet, or a flushing suspend)
 */
struct dm_user_msg {
	struct list_head list;
	struct bio *bio;
	struct dm_user_message hdr;
	struct bvec_iter iter;
	unsigned long deadline;
};

/**
 * struct dm_user_channel - one open file of the control device
 * @t: the target
 * @lock: serialises read(), write() and their state below
 * @reading: message being read by the daemon, or NULL
 * @read_pos: header bytes of @reading already returned
 * @awaiting: messages read in full and waiting for their response
 * @writing: message whose response is being written, or NULL
 * @resp: response header being assembled
 * @resp_pos: bytes of @resp received so far
 * @poisoned: a response named an unknown seq; all later writes fail
 */
struct dm_user_channel {
	struct dm_user_target *t;
	struct mutex lock; /* see the kernel-doc above */
	struct dm_user_msg *reading;
	size_t read_pos;
	struct list_head awaiting;
	struct dm_user_msg *writing;
	struct dm_user_message resp;
	size_t resp_pos;
	bool poisoned;
};

static const struct {
	blk_opf_t req;
	u64 user;
} dm_user_flags[] = {
	{ REQ_FAILFAST_DEV, DM_USER_REQ_MAP_FLAG_FAILFAST_DEV },
	{ REQ_FAILFAST_TRANSPORT, DM_USER_REQ_MAP_FLAG_FAILFAST_TRANSPORT },
	{ REQ_FAILFAST_DRIVER, DM_USER_REQ_MAP_FLAG_FAILFAST_DRIVER },
	{ REQ_SYNC, DM_USER_REQ_MAP_FLAG_SYNC },
	{ REQ_META, DM_USER_REQ_MAP_FLAG_META },
	{ REQ_PRIO, DM_USER_REQ_MAP_FLAG_PRIO },
	{ REQ_NOMERGE, DM_USER_REQ_MAP_FLAG_NOMERGE },
	{ REQ_IDLE, DM_USER_REQ_MAP_FLAG_IDLE },
	{ REQ_INTEGRITY, DM_USER_REQ_MAP_FLAG_INTEGRITY },
	{ REQ_FUA, DM_USER_REQ_MAP_FLAG_FUA },
	{ REQ_PREFLUSH, DM_USER_REQ_MAP_FLAG_PREFLUSH },
	{ REQ_RAHEAD, DM_USER_REQ_MAP_FLAG_RAHEAD },
	{ REQ_BACKGROUND, DM_USER_REQ_MAP_FLAG_BACKGROUND },
	{ REQ_NOWAIT, DM_USER_REQ_MAP_FLAG_NOWAIT },
#ifdef REQ_CGROUP_PUNT
	{ REQ_CGROUP_PUNT, DM_USER_REQ_MAP_FLAG_CGROUP_PUNT },
#endif
	{ REQ_NOUNMAP, DM_USER_REQ_MAP_FLAG_NOUNMAP },
	{ REQ_POLLED, DM_USER_REQ_MAP_FLAG_HIPRI },
	{ REQ_DRV, DM_USER_REQ_MAP_FLAG_DRV },
	{ REQ_SWAP, DM_USER_REQ_MAP_FLAG_SWAP },
};

/* Bits the encoding does not know are dropped, never an error. */
static u64 dm_user_encode_flags(blk_opf_t opf)
{
	u64 flags = 0;
	unsigned int i;

	for (i = 0; i < ARRAY_SIZE(dm_user_flags); i++)
		if (opf & dm_user_flags[i].req)
			flags |= dm_user_flags[i].user;
	return flags;
}

static void msg_end(struct dm_user_msg *m, blk_status_t status)
{
	struct bio *bio = m->bio;

	/* m lives in the bio's per-bio data: do not touch it after this. */
	bio->bi_status = status;
	bio_endio(bio);
}

static void msgs_end(struct list_head *msgs, blk_status_t status)
{
	struct dm_user_msg *m, *tmp;

	list_for_each_entry_safe(m, tmp, msgs, list) {
		list_del(&m->list);
		msg_end(m, status);
	}
}

/* Complete a message a channel took: it is no longer in flight. */
static void channel_msg_end(struct dm_user_channel *c, struct dm_user_msg *m,
			    blk_status_t status)
{
	atomic_dec(&c->t->nr_in_flight);
	msg_end(m, status);
}

/*
 * "Unsupported" is a legitimate answer only for discards, which are
 * advisory: the block layer reports BLK_STS_NOTSUPP as success to
 * BLKDISCARD and file systems ignore it.  For a read, a write or a flush
 * it would be wrong: fsync() on the block device takes -EOPNOTSUPP from a
 * flush as "no cache to flush", so the data would silently not be durable.
 */
static blk_status_t dm_user_resp_status(const struct dm_user_msg *m, u64 code)
{
	if (code == DM_USER_RESP_SUCCESS)
		return BLK_STS_OK;
	if (code == DM_USER_RESP_UNSUPPORTED &&
	    m->hdr.type == DM_USER_REQ_MAP_DISCARD)
		return BLK_STS_NOTSUPP;
	return BLK_STS_IOERR;
}

/* Payload bytes still to go to the daemon (WRITE) or come from it (READ). */
static size_t msg_out_left(const struct dm_user_msg *m)
{
	return m->hdr.type == DM_USER_REQ_MAP_WRITE ? m->iter.bi_size : 0;
}

static size_t msg_in_left(const struct dm_user_msg *m)
{
	return m->hdr.type == DM_USER_REQ_MAP_READ ? m->iter.bi_size : 0;
}

static size_t msg_copy_to_user(struct dm_user_msg *m, struct iov_iter *to)
{
	size_t done = 0;

	while (m->iter.bi_size && iov_iter_count(to)) {
		struct bio_vec bv = bio_iter_iovec(m->bio, m->iter);
		size_t n = copy_page_to_iter(bv.bv_page, bv.bv_offset,
					     bv.bv_len, to);

		bio_advance_iter_single(m->bio, &m->iter, n);
		done += n;
		if (n < bv.bv_len)
			break;
	}
	return done;
}

static size_t msg_copy_from_user(struct dm_user_msg *m, struct iov_iter *from)
{
	size_t done = 0;

	while (m->iter.bi_size && iov_iter_count(from)) {
		struct bio_vec bv = bio_iter_iovec(m->bio, m->iter);
		size_t n = copy_page_from_iter(bv.bv_page, bv.bv_offset,
					       bv.bv_len, from);

		flush_dcache_page(bv.bv_page);
		bio_advance_iter_single(m->bio, &m->iter, n);
		done += n;
		if (n < bv.bv_len)
			break;
	}
	return done;
}

static void dm_user_target_free(struct kref *kref)
{
	struct dm_user_target *t = container_of(kref, struct dm_user_target,
						kref);

	kfree(t->miscdev.name);
	kfree(t);
}

static int channel_lock(struct dm_user_channel *c, bool nowait)
{
	if (nowait)
		return mutex_trylock(&c->lock) ? 0 : -EAGAIN;
	return mutex_lock_interruptible(&c->lock);
}

static bool iocb_nowait(struct kiocb *iocb)
{
	return (iocb->ki_filp->f_flags & O_NONBLOCK) ||
	       (iocb->ki_flags & IOCB_NOWAIT);
}

static int dm_user_open(struct inode *inode, struct file *file)
{
	struct dm_user_target *t = container_of(file->private_data,
						struct dm_user_target, miscdev);
	struct dm_user_channel *c;

	c = kzalloc(sizeof(*c), GFP_KERNEL);
	if (!c)
		return -ENOMEM;
	c->t = t;
	mutex_init(&c->lock);
	INIT_LIST_HEAD(&c->awaiting);

	/* misc_deregister() in dtr waits for us, so t is still alive. */
	spin_lock_irq(&t->lock);
	if (t->destroyed) {
		spin_unlock_irq(&t->lock);
		kfree(c);
		return -ENODEV;
	}
	kref_get(&t->kref);
	t->nr_channels++;
	t->daemon_seen = true;
	spin_unlock_irq(&t->lock);

	file->private_data = c;
	file->f_mode |= FMODE_NOWAIT;
	return 0;
}

static int dm_user_release(struct inode *inode, struct file *file)
{
	struct dm_user_channel *c = file->private_data;
	struct dm_user_target *t = c->t;
	struct dm_user_msg *m, *tmp;
	LIST_HEAD(taken);
	LIST_HEAD(queued);

	/* Everything this channel took fails; it is never handed out twice. */
	if (c->reading)
		list_add_tail(&c->reading->list, &taken);
	if (c->writing)
		list_add_tail(&c->writing->list, &taken);
	list_splice_tail_init(&c->awaiting, &taken);

	spin_lock_irq(&t->lock);
	if (!--t->nr_channels) {
		list_splice_tail_init(&t->queue, &queued);
		t->nr_queued = 0;
	}
	spin_unlock_irq(&t->lock);

	list_for_each_entry_safe(m, tmp, &taken, list) {
		list_del(&m->list);
		channel_msg_end(c, m, BLK_STS_IOERR);
	}
	msgs_end(&queued, BLK_STS_IOERR);
	mutex_destroy(&c->lock);
	kfree(c);
	kref_put(&t->kref, dm_user_target_free);
	return 0;
}

/* Called with c->lock held and c->reading set. */
static ssize_t channel_read_locked(struct dm_user_channel *c,
				   struct iov_iter *to)
{
	struct dm_user_msg *m = c->reading;
	struct dm_user_message hdr;
	size_t n;

	/*
	 * The header lives in the bio's slab object, which hardened usercopy
	 * rightly refuses to copy to userspace: go through the stack.
	 */
	if (c->read_pos < sizeof(hdr)) {
		hdr = m->hdr;
		n = copy_to_iter((u8 *)&hdr + c->read_pos,
				 sizeof(hdr) - c->read_pos, to);
		c->read_pos += n;
	} else {
		n = msg_copy_to_user(m, to);
	}
	if (!n)
		return -EFAULT;

	if (c->read_pos == sizeof(hdr) && !msg_out_left(m)) {
		list_add_tail(&m->list, &c->awaiting);
		c->reading = NULL;
	}
	return n;
}

/* Take the oldest queued message; called with c->lock held. */
static bool channel_take(struct dm_user_channel *c)
{
	struct dm_user_target *t = c->t;
	struct dm_user_msg *m;

	spin_lock_irq(&t->lock);
	m = list_first_entry_or_null(&t->queue, struct dm_user_msg, list);
	if (m) {
		list_del(&m->list);
		t->nr_queued--;
		atomic_inc(&t->nr_in_flight);
	}
	spin_unlock_irq(&t->lock);

	c->reading = m;
	c->read_pos = 0;
	return m;
}

static bool channel_ready(struct dm_user_target *t)
{
	return !list_empty_careful(&t->queue) || READ_ONCE(t->destroyed);
}

static ssize_t dm_user_read_iter(struct kiocb *iocb, struct iov_iter *to)
{
	struct dm_user_channel *c = iocb->ki_filp->private_data;
	struct dm_user_target *t = c->t;
	bool nowait = iocb_nowait(iocb);
	ssize_t ret;

	if (!iov_iter_count(to))
		return 0;

	for (;;) {
		ret = channel_lock(c, nowait);
		if (ret)
			goto out;
		if (READ_ONCE(t->destroyed)) {
			ret = -ENOTBLK;
			goto unlock;
		}
		if (c->reading || channel_take(c))
			break;
		mutex_unlock(&c->lock);
		if (nowait)
			return -EAGAIN;
		ret = wait_event_interruptible_exclusive(t->wq, channel_ready(t));
		if (ret)
			goto out;
	}
	ret = channel_read_locked(c, to);
unlock:
	mutex_unlock(&c->lock);
out:
	/*
	 * Readers wait exclusively, so each new message wakes one of them.
	 * A reader leaving with an error (a signal, or a fault before it got
	 * anything) may have been that one: pass the wake-up on.  A reader
	 * that got a message has used its wake-up, and one that went on to
	 * a message queued meanwhile leaves that message's wake-up to another
	 * sleeper, which finds the queue empty at worst.
	 */
	if (ret < 0 && !list_empty_careful(&t->queue) &&
	    wq_has_sleeper(&t->wq))
		wake_up_interruptible_poll(&t->wq, EPOLLIN | EPOLLRDNORM);
	return ret;
}

static struct dm_user_msg *channel_find(struct dm_user_channel *c, u64 seq)
{
	struct dm_user_msg *m;

	list_for_each_entry(m, &c->awaiting, list)
		if (m->hdr.seq == seq)
			return m;
	return NULL;
}

/*
 * Consume at most one response: its header (possibly split over several
 * writes), then, for a successful READ, its payload.  Bytes beyond the end
 * of the response are refused with -EINVAL and the request fails.
 */
static ssize_t channel_write_locked(struct dm_user_channel *c,
				    struct iov_iter *from)
{
	size_t count = iov_iter_count(from);
	struct dm_user_msg *m = c->writing;
	size_t done = 0, n;

	if (!m) {
		n = copy_from_iter((u8 *)&c->resp + c->resp_pos,
				   min(count, sizeof(c->resp) - c->resp_pos),
				   from);
		if (!n)
			return -EFAULT;
		c->resp_pos += n;
		if (c->resp_pos < sizeof(c->resp))
			return n;
		c->resp_pos = 0;

		m = channel_find(c, c->resp.seq);
		if (!m) {
			c->poisoned = true;
			DMERR_LIMIT("%s: response for unknown seq %llu",
				    c->t->miscdev.name, c->resp.seq);
			return -EINVAL;
		}
		list_del(&m->list);
		/* An error response carries no payload. */
		if (c->resp.type != DM_USER_RESP_SUCCESS)
			m->iter.bi_size = 0;
		c->writing = m;
		done = n;
		count -= n;
	}

	if (count > msg_in_left(m)) {
		c->writing = NULL;
		channel_msg_end(c, m, BLK_STS_IOERR);
		return -EINVAL;
	}
	if (count) {
		n = msg_copy_from_user(m, from);
		if (!n && !done)
			return -EFAULT;
		done += n;
	}
	if (!msg_in_left(m)) {
		c->writing = NULL;
		channel_msg_end(c, m, dm_user_resp_status(m, c->resp.type));
	}
	return done;
}

static ssize_t dm_user_write_iter(struct kiocb *iocb, struct iov_iter *from)
{
	struct dm_user_channel *c = iocb->ki_filp->private_data;
	ssize_t ret;

	if (!iov_iter_count(from))
		return 0;
	ret = channel_lock(c, iocb_nowait(iocb));
	if (ret)
		return ret;
	if (READ_ONCE(c->t->destroyed))
		ret = -ENOTBLK;
	else if (c->poisoned)
		ret = -EINVAL;
	else
		ret = channel_write_locked(c, from);
	mutex_unlock(&c->lock);
	return ret;
}

static __poll_t dm_user_poll(struct file *file, poll_table *wait)
{
	struct dm_user_channel *c = file->private_data;
	struct dm_user_target *t = c->t;

	poll_wait(file, &t->wq, wait);
	if (READ_ONCE(t->destroyed))
		return EPOLLHUP | EPOLLERR;
	if (READ_ONCE(c->reading) || !list_empty_careful(&t->queue))
		return EPOLLIN | EPOLLRDNORM | EPOLLOUT | EPOLLWRNORM;
	return EPOLLOUT | EPOLLWRNORM;
}

static const struct file_operations dm_user_fops = {
	.owner = THIS_MODULE,
	.open = dm_user_open,
	.release = dm_user_release,
	.read_iter = dm_user_read_iter,
	.write_iter = dm_user_write_iter,
	/*
	 * A daemon may splice a response from a pipe: data it vmspliced, or
	 * page-cache pages of the file it reads from, reach the bio with one
	 * kernel copy and no copy from user memory.
	 */
	.splice_write = iter_file_splice_write,
	.poll = dm_user_poll,
};

/* Whether queued messages fail at their deadline; called with t->lock held. */
static bool dm_user_deadlines_apply(struct dm_user_target *t)
{
	return !t->nr_channels || t->suspend == DM_USER_SUSPEND_FLUSH;
}

/*
 * Fails queued messages whose deadline passed while no channel existed, or
 * during a flushing suspend.
 */
static void dm_user_timeout(struct work_struct *work)
{
	struct dm_user_target *t = container_of(to_delayed_work(work),
						struct dm_user_target,
						timeout_work);
	unsigned long next = 0;
	struct dm_user_msg *m, *tmp;
	bool pending = false;
	LIST_HEAD(expired);

	spin_lock_irq(&t->lock);
	if (dm_user_deadlines_apply(t)) {
		list_for_each_entry_safe(m, tmp, &t->queue, list) {
			if (time_after_eq(jiffies, m->deadline)) {
				list_move_tail(&m->list, &expired);
				t->nr_queued--;
			} else if (!pending || time_before(m->deadline, next)) {
				next = m->deadline;
				pending = true;
			}
		}
		if (pending)
			schedule_delayed_work(&t->timeout_work, next - jiffies);
	}
	spin_unlock_irq(&t->lock);

	list_for_each_entry(m, &expired, list)
		DMERR_LIMIT("%s: no daemon took the request in time, failing I/O to sector %llu",
			    t->miscdev.name, m->hdr.sector);
	msgs_end(&expired, BLK_STS_IOERR);
}

static int dm_user_map(struct dm_target *ti, struct bio *bio)
{
	struct dm_user_target *t = ti->private;
	struct dm_user_msg *m = dm_per_bio_data(bio, sizeof(*m));
	unsigned int timeout = READ_ONCE(dm_user_daemon_timeout_msec);
	unsigned long flags;
	u64 type;

	/*
	 * Device-mapper hands a bio-based target only reads, writes (flushes
	 * are empty writes with REQ_PREFLUSH) and the operations it asked for
	 * in the constructor: discards.  Write-zeroes and secure erase are not
	 * requested and the device is not zoned, so the block layer refuses
	 * those before they get here.
	 */
	switch (bio_op(bio)) {
	case REQ_OP_READ:
		type = DM_USER_REQ_MAP_READ;
		break;
	case REQ_OP_WRITE:
		type = DM_USER_REQ_MAP_WRITE;
		break;
	case REQ_OP_DISCARD:
		type = DM_USER_REQ_MAP_DISCARD;
		break;
	default:
		return DM_MAPIO_KILL;
	}

	m->bio = bio;
	m->hdr.type = type;
	m->hdr.flags = dm_user_encode_flags(bio->bi_opf);
	/* An empty flush has no position; report 0 rather than underflow. */
	m->hdr.sector = bio->bi_iter.bi_size ?
		dm_target_offset(ti, bio->bi_iter.bi_sector) : 0;
	m->hdr.len = bio->bi_iter.bi_size;
	m->iter = bio->bi_iter;
	if (type == DM_USER_REQ_MAP_DISCARD)
		m->iter.bi_size = 0;
	m->deadline = jiffies + msecs_to_jiffies(timeout);

	spin_lock_irqsave(&t->lock, flags);
	if (t->suspend == DM_USER_SUSPEND_REQUEUE) {
		/* A noflush suspend is starting: device-mapper holds the bio. */
		spin_unlock_irqrestore(&t->lock, flags);
		return DM_MAPIO_REQUEUE;
	}
	if (t->daemon_seen && !t->nr_channels) {
		spin_unlock_irqrestore(&t->lock, flags);
		DMERR_LIMIT("%s: daemon gone, failing I/O to sector %llu",
			    t->miscdev.name, m->hdr.sector);
		return DM_MAPIO_KILL;
	}
	m->hdr.seq = t->next_seq++;
	list_add_tail(&m->list, &t->queue);
	t->nr_queued++;
	if (dm_user_deadlines_apply(t))
		schedule_delayed_work(&t->timeout_work,
				      msecs_to_jiffies(timeout));
	spin_unlock_irqrestore(&t->lock, flags);

	/*
	 * Most submitters now sleep waiting for the bio: a sync wake-up lets
	 * the scheduler run the daemon on this CPU.
	 */
	wake_up_interruptible_sync_poll(&t->wq, EPOLLIN | EPOLLRDNORM);
	return DM_MAPIO_SUBMITTED;
}

static bool dm_user_name_ok(const char *name)
{
	return *name && !strchr(name, '/') && strcmp(name, ".") &&
	       strcmp(name, "..");
}

/* Called with dm_user_names_lock held. */
static bool dm_user_name_taken(const char *miscname)
{
	struct dm_user_target *t;

	list_for_each_entry(t, &dm_user_targets, node)
		if (!strcmp(t->miscdev.name, miscname))
			return true;
	return false;
}

/*
 * The two numbers are kept for compatibility with Android's libdm, which
 * repeats the target's start and length; they are checked to be sector
 * numbers and echoed in the table.  dm_read_arg() reads unsigned ints only,
 * too small for sector numbers.
 */
static int dm_user_read_sector(struct dm_arg_set *as, sector_t *sector)
{
	unsigned long long v;

	if (kstrtoull(dm_shift_arg(as), 10, &v) || v != (sector_t)v)
		return -EINVAL;
	*sector = v;
	return 0;
}

/* Table line: <start> <len> user <start> <len> <name> */
static int dm_user_ctr(struct dm_target *ti, unsigned int argc, char **argv)
{
	struct dm_arg_set as = { .argc = argc, .argv = argv };
	struct dm_user_target *t = NULL;
	sector_t start, len;
	const char *name;
	int r;

	if (as.argc != 3) {
		ti->error = "Invalid argument count, want <start> <len> <name>";
		return -EINVAL;
	}
	if (dm_user_read_sector(&as, &start)) {
		ti->error = "Invalid start sector";
		return -EINVAL;
	}
	if (dm_user_read_sector(&as, &len)) {
		ti->error = "Invalid length";
		return -EINVAL;
	}
	name = dm_shift_arg(&as);
	if (!dm_user_name_ok(name)) {
		ti->error = "Invalid control device name";
		return -EINVAL;
	}

	r = dm_set_target_max_io_len(ti, DM_USER_MAX_IO_SECTORS);
	if (r) {
		ti->error = "Cannot set the maximum request size";
		return r;
	}

	r = -ENOMEM;
	t = kzalloc(sizeof(*t), GFP_KERNEL);
	if (!t)
		goto bad_alloc;
	kref_init(&t->kref);
	spin_lock_init(&t->lock);
	INIT_LIST_HEAD(&t->queue);
	atomic_set(&t->nr_in_flight, 0);
	init_waitqueue_head(&t->wq);
	INIT_DELAYED_WORK(&t->timeout_work, dm_user_timeout);
	t->start = start;
	t->len = len;
	t->miscdev.name = kasprintf(GFP_KERNEL, "dm-user/%s", name);
	if (!t->miscdev.name)
		goto bad_alloc;
	t->miscdev.minor = MISC_DYNAMIC_MINOR;
	t->miscdev.fops = &dm_user_fops;

	mutex_lock(&dm_user_names_lock);
	r = dm_user_name_taken(t->miscdev.name) ? -EBUSY :
		misc_register(&t->miscdev);
	if (!r)
		list_add_tail(&t->node, &dm_user_targets);
	mutex_unlock(&dm_user_names_lock);
	if (r) {
		ti->error = "Cannot register control device";
		goto bad;
	}

	ti->private = t;
	ti->per_io_data_size = sizeof(struct dm_user_msg);
	ti->num_flush_bios = 1;
	ti->flush_supported = true;
	ti->num_discard_bios = 1;
	ti->discards_supported = true;
	return 0;

bad_alloc:
	ti->error = "Cannot allocate target";
bad:
	if (t) {
		kfree(t->miscdev.name);
		kfree(t);
	}
	return r;
}

static void dm_user_dtr(struct dm_target *ti)
{
	struct dm_user_target *t = ti->private;
	LIST_HEAD(dead);

	mutex_lock(&dm_user_names_lock);
	list_del(&t->node);
	misc_deregister(&t->miscdev);
	mutex_unlock(&dm_user_names_lock);

	spin_lock_irq(&t->lock);
	t->destroyed = true;
	list_splice_tail_init(&t->queue, &dead);
	t->nr_queued = 0;
	spin_unlock_irq(&t->lock);

	cancel_delayed_work_sync(&t->timeout_work);
	msgs_end(&dead, BLK_STS_IOERR);
	wake_up_interruptible_all(&t->wq);
	kref_put(&t->kref, dm_user_target_free);
}

/*
 * Before a suspend waits for in-flight bios.  noflush: queued messages are
 * completed with BLK_STS_DM_REQUEUE, so device-mapper holds their bios and
 * resubmits them after resume; map() pushes back new bios the same way.
 * Flushing suspend: the daemon may still take queued messages, but each
 * fails once the daemon timeout passes without a channel taking it, so a
 * live but silent daemon cannot block the suspend.  Messages a channel has
 * taken belong to the daemon: the suspend waits for their responses.
 */
static void dm_user_presuspend(struct dm_target *ti)
{
	struct dm_user_target *t = ti->private;
	unsigned long now = jiffies;
	unsigned long cap = now +
		msecs_to_jiffies(READ_ONCE(dm_user_daemon_timeout_msec));
	unsigned long first = cap;
	struct dm_user_msg *m;
	LIST_HEAD(requeue);

	spin_lock_irq(&t->lock);
	if (dm_noflush_suspending(ti)) {
		t->suspend = DM_USER_SUSPEND_REQUEUE;
		list_splice_tail_init(&t->queue, &requeue);
		t->nr_queued = 0;
	} else {
		t->suspend = DM_USER_SUSPEND_FLUSH;
		list_for_each_entry(m, &t->queue, list) {
			if (time_after(m->deadline, cap))
				m->deadline = cap;
			if (time_before(m->deadline, first))
				first = m->deadline;
		}
		if (t->nr_queued)
			mod_delayed_work(system_wq, &t->timeout_work,
					 time_after(first, now) ? first - now : 0);
	}
	spin_unlock_irq(&t->lock);

	msgs_end(&requeue, BLK_STS_DM_REQUEUE);
}

/* The suspend was cancelled, or the device resumes: serve as before. */
static void dm_user_resume(struct dm_target *ti)
{
	struct dm_user_target *t = ti->private;

	spin_lock_irq(&t->lock);
	t->suspend = DM_USER_RUNNING;
	spin_unlock_irq(&t->lock);
}

static const char *dm_user_daemon_state(const struct dm_user_target *t)
{
	if (t->nr_channels)
		return "attached";
	return t->daemon_seen ? "detached" : "waiting";
}

/*
 * INFO:  <channels> <queued> <in_flight> <daemon> <timeout_ms>
 * TABLE: <start> <len> <name>
 *
 * <daemon> is waiting (no channel opened yet), attached or detached (all
 * channels closed: I/O fails at once).  <timeout_ms> is the time left
 * before the oldest queued request fails for want of a daemon, or "-" when
 * no such deadline runs.
 */
static void dm_user_status(struct dm_target *ti, status_type_t type,
			   unsigned int status_flags, char *result,
			   unsigned int maxlen)
{
	struct dm_user_target *t = ti->private;
	unsigned int sz = 0, channels, queued;
	const char *daemon;
	struct dm_user_msg *m;
	long left = -1;

	switch (type) {
	case STATUSTYPE_INFO:
		spin_lock_irq(&t->lock);
		channels = t->nr_channels;
		queued = t->nr_queued;
		daemon = dm_user_daemon_state(t);
		m = list_first_entry_or_null(&t->queue, struct dm_user_msg,
					     list);
		if (m && dm_user_deadlines_apply(t))
			left = max(0L, (long)(m->deadline - jiffies));
		spin_unlock_irq(&t->lock);
		DMEMIT("%u %u %d %s ", channels, queued,
		       atomic_read(&t->nr_in_flight), daemon);
		if (left < 0)
			DMEMIT("-");
		else
			DMEMIT("%u", jiffies_to_msecs(left));
		break;
	case STATUSTYPE_TABLE:
		DMEMIT("%llu %llu %s", (unsigned long long)t->start,
		       (unsigned long long)t->len,
		       t->miscdev.name + strlen("dm-user/"));
		break;
	case STATUSTYPE_IMA:
		*result = '\0';
		break;
	}
}

/*
 * With no underlying device nothing would advertise discard support, so
 * the queue would refuse discards before they reach map().
 */
static void dm_user_io_hints(struct dm_target *ti, struct queue_limits *limits)
{
	limits->max_hw_discard_sectors = UINT_MAX >> SECTOR_SHIFT;
	limits->max_discard_sectors = UINT_MAX >> SECTOR_SHIFT;
	limits->discard_granularity = SECTOR_SIZE;
}

/*
 * There are no underlying devices.  Some kernels (6.1) only call io_hints
 * for targets that have this method, so it is there and finds nothing.
 */
static int dm_user_iterate_devices(struct dm_target *ti,
				   iterate_devices_callout_fn fn, void *data)
{
	return 0;
}

static struct target_type dm_user_target_type = {
	.name = "user",
	.version = {1, 3, 0},
	.features = DM_TARGET_NOWAIT,
	.module = THIS_MODULE,
	.ctr = dm_user_ctr,
	.dtr = dm_user_dtr,
	.map = dm_user_map,
	.presuspend = dm_user_presuspend,
	.presuspend_undo = dm_user_resume,
	.resume = dm_user_resume,
	.status = dm_user_status,
	.io_hints = dm_user_io_hints,
	.iterate_devices = dm_user_iterate_devices,
};

static int __init dm_user_init(void)
{
	BUILD_BUG_ON(sizeof(struct dm_user_message) !=
		     DM_USER_MESSAGE_HEADER_SIZE);
	return dm_register_target(&dm_user_target_type);
}

static void __exit dm_user_exit(void)
{
	dm_unregister_target(&dm_user_target_type);
}

module_init(dm_user_init);
module_exit(dm_user_exit);

MODULE_DESCRIPTION(DM_NAME " target serving I/O from a userspace daemon");
MODULE_AUTHOR("The snapuserd-rs authors");
MODULE_LICENSE("GPL");
