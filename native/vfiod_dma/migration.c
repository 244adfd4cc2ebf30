// SPDX-License-Identifier: GPL-2.0
/*
 * vfiod_dma migration v2: STOP_COPY, P2P and PRE_COPY over the device state.
 *
 * The stream is a header, then records: DATA records carry one chunk of the state at
 * its offset, one END record carries the crc32 of the whole state and closes the stream.
 * The saving session first sends every chunk once (the "initial" bytes of PRE_COPY),
 * then the chunks changed since they were sent (the "dirty" bytes); STOP_COPY sends what
 * is still owed and END. The resuming side applies records to a staging copy and only
 * RESUMING -> STOP, with END seen and the crc matching, makes it the device state.
 * native/vfiod_dma/README.md has the byte layout.
 */
#include <linux/anon_inodes.h>
#include <linux/bitmap.h>
#include <linux/crc32.h>
#include <linux/file.h>
#include <linux/slab.h>
#include <linux/vmalloc.h>

#include "vfiod_dma.h"

#define VDMA_MAGIC	0x414d44444f494656ULL	/* "VFIODDMA" little-endian */
#define VDMA_VERSION	2
#define VDMA_REC_DATA	1
#define VDMA_REC_END	2

struct vdma_stream_header {
	__le64 magic;
	__le32 version;
	__le32 chunk;		/* VDMA_CHUNK of the sender (informational) */
	__le64 state_size;
};

struct vdma_record {
	__le32 type;
	__le32 length;		/* DATA: bytes that follow; END: 0 */
	__le64 arg;		/* DATA: offset in the state; END: crc32 of the state */
};

struct vdma_migf {
	struct file *filp;
	struct vdma_dev *vd;	/* kept alive by a reference on vd->vdev.device */
	bool disabled;
	/* saving */
	bool hdr_sent, end_sent;
	size_t cursor;		/* next chunk of the initial pass */
	u8 *out;		/* the record being read out */
	size_t out_len, out_pos;
	/* resuming */
	bool broken, end_seen;
	struct vdma_stream_header hdr;
	size_t hdr_got;
	struct vdma_record rec;
	size_t rec_got, data_got;
	u32 end_crc;
	void *staging;
};

u32 vdma_crc(const void *buf, size_t len)
{
	return crc32_le(0, buf, len);
}

static size_t vdma_chunk_len(struct vdma_dev *vd, size_t c)
{
	return min(VDMA_CHUNK, vd->state_size - c * VDMA_CHUNK);
}

/* -- files ----------------------------------------------------------------------------- */

static void vdma_disable_migf(struct vdma_migf *migf)
{
	migf->disabled = true;
	kfree(migf->out);
	migf->out = NULL;
	vfree(migf->staging);
	migf->staging = NULL;
}

/* Ends both data sessions (state_mutex held); their fds then answer ENODEV. */
void vdma_disable_files(struct vdma_dev *vd)
{
	if (vd->saving) {
		vdma_disable_migf(vd->saving);
		fput(vd->saving->filp);
		vd->saving = NULL;
	}
	if (vd->resuming) {
		vdma_disable_migf(vd->resuming);
		fput(vd->resuming->filp);
		vd->resuming = NULL;
	}
}

/* The last reference is gone, so the device no longer points here. */
static int vdma_release_migf(struct inode *inode, struct file *filp)
{
	struct vdma_migf *migf = filp->private_data;

	vdma_disable_migf(migf);
	put_device(&migf->vd->vdev.device);
	kfree(migf);
	return 0;
}

/* -- saving ---------------------------------------------------------------------------- */

static void vdma_put_chunk(struct vdma_migf *migf, size_t c)
{
	struct vdma_dev *vd = migf->vd;
	struct vdma_record rec = {
		.type = cpu_to_le32(VDMA_REC_DATA),
		.length = cpu_to_le32(vdma_chunk_len(vd, c)),
		.arg = cpu_to_le64(c * VDMA_CHUNK),
	};

	clear_bit(c, vd->dirty);	/* sent as it is now */
	memcpy(migf->out, &rec, sizeof(rec));
	memcpy(migf->out + sizeof(rec), (u8 *)vd->state + c * VDMA_CHUNK, vdma_chunk_len(vd, c));
	migf->out_len = sizeof(rec) + vdma_chunk_len(vd, c);
}

/* Fills migf->out with the next record; false at the (temporary or final) end. */
static bool vdma_next_record(struct vdma_migf *migf)
{
	struct vdma_dev *vd = migf->vd;
	size_t n = vdma_nchunks(vd->state_size), c;

	migf->out_pos = 0;
	if (!migf->hdr_sent) {
		struct vdma_stream_header hdr = {
			.magic = cpu_to_le64(VDMA_MAGIC),
			.version = cpu_to_le32(VDMA_VERSION),
			.chunk = cpu_to_le32(VDMA_CHUNK),
			.state_size = cpu_to_le64(vd->state_size),
		};

		memcpy(migf->out, &hdr, sizeof(hdr));
		migf->out_len = sizeof(hdr);
		migf->hdr_sent = true;
		return true;
	}
	if (migf->cursor < n) {
		vdma_put_chunk(migf, migf->cursor++);
		return true;
	}
	c = find_first_bit(vd->dirty, n);
	if (c < n) {
		vdma_put_chunk(migf, c);
		return true;
	}
	if (vd->mig_state == VFIO_DEVICE_STATE_STOP_COPY && !migf->end_sent) {
		struct vdma_record rec = {
			.type = cpu_to_le32(VDMA_REC_END),
			.arg = cpu_to_le64(vdma_crc(vd->state, vd->state_size)),
		};

		memcpy(migf->out, &rec, sizeof(rec));
		migf->out_len = sizeof(rec);
		migf->end_sent = true;
		return true;
	}
	migf->out_len = 0;
	return false;
}

static ssize_t vdma_save_read(struct file *filp, char __user *buf, size_t len, loff_t *ppos)
{
	struct vdma_migf *migf = filp->private_data;
	struct vdma_dev *vd = migf->vd;
	size_t done = 0;
	ssize_t ret;

	if (ppos)
		return -ESPIPE;
	mutex_lock(&vd->state_mutex);
	if (migf->disabled) {
		ret = -ENODEV;
		goto out;
	}
	while (done < len) {
		size_t n;

		if (migf->out_pos == migf->out_len && !vdma_next_record(migf))
			break;
		n = min(len - done, migf->out_len - migf->out_pos);
		if (copy_to_user(buf + done, migf->out + migf->out_pos, n)) {
			ret = -EFAULT;
			goto out;
		}
		migf->out_pos += n;
		done += n;
	}
	if (vd->mig_state == VFIO_DEVICE_STATE_STOP_COPY)
		vd->stopcopy_bytes += done;
	else
		vd->precopy_bytes += done;
	/* pre-copy's end is temporary (ENOMSG); STOP_COPY's is for good (0) */
	ret = done || vd->mig_state == VFIO_DEVICE_STATE_STOP_COPY ? done : -ENOMSG;
out:
	mutex_unlock(&vd->state_mutex);
	return ret;
}

/* Bytes the session still owes: (initial, dirty) as VFIO_MIG_GET_PRECOPY_INFO counts them. */
static void vdma_owed(struct vdma_migf *migf, u64 *initial, u64 *dirty)
{
	struct vdma_dev *vd = migf->vd;
	size_t n = vdma_nchunks(vd->state_size), c;

	*initial = migf->hdr_sent ? 0 : sizeof(struct vdma_stream_header);
	*initial += (n - migf->cursor) * sizeof(struct vdma_record) +
		    (vd->state_size - min(vd->state_size, migf->cursor * VDMA_CHUNK));
	*dirty = 0;
	for_each_set_bit(c, vd->dirty, migf->cursor)
		*dirty += sizeof(struct vdma_record) + vdma_chunk_len(vd, c);
	/* a record half read out is owed too, on the side it was taken from */
	*initial += migf->out_len - migf->out_pos;
}

static long vdma_save_ioctl(struct file *filp, unsigned int cmd, unsigned long arg)
{
	struct vdma_migf *migf = filp->private_data;
	struct vdma_dev *vd = migf->vd;
	struct vfio_precopy_info info;
	size_t minsz = offsetofend(struct vfio_precopy_info, dirty_bytes);
	long ret = 0;

	if (cmd != VFIO_MIG_GET_PRECOPY_INFO)
		return -ENOTTY;
	if (copy_from_user(&info, (void __user *)arg, minsz))
		return -EFAULT;
	if (info.argsz < minsz)
		return -EINVAL;
	mutex_lock(&vd->state_mutex);
	if (vd->mig_state != VFIO_DEVICE_STATE_PRE_COPY &&
	    vd->mig_state != VFIO_DEVICE_STATE_PRE_COPY_P2P)
		ret = -EINVAL;
	else if (migf->disabled)
		ret = -ENODEV;
	else
		vdma_owed(migf, &info.initial_bytes, &info.dirty_bytes);
	mutex_unlock(&vd->state_mutex);
	if (ret)
		return ret;
	return copy_to_user((void __user *)arg, &info, minsz) ? -EFAULT : 0;
}

static const struct file_operations vdma_save_fops = {
	.owner = THIS_MODULE,
	.read = vdma_save_read,
	.unlocked_ioctl = vdma_save_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.release = vdma_release_migf,
};

/* -- resuming -------------------------------------------------------------------------- */

/* Takes up to len bytes of the stream; returns how many, or -errno for a bad stream. */
static ssize_t vdma_take(struct vdma_migf *migf, const char __user *buf, size_t len)
{
	size_t hlen = sizeof(migf->hdr), rlen = sizeof(migf->rec), n;
	u64 size = le64_to_cpu(migf->hdr.state_size);

	if (migf->hdr_got < hlen) {
		n = min(len, hlen - migf->hdr_got);
		if (copy_from_user((u8 *)&migf->hdr + migf->hdr_got, buf, n))
			return -EFAULT;
		migf->hdr_got += n;
		if (migf->hdr_got < hlen)
			return n;
		size = le64_to_cpu(migf->hdr.state_size);
		if (le64_to_cpu(migf->hdr.magic) != VDMA_MAGIC ||
		    le32_to_cpu(migf->hdr.version) != VDMA_VERSION ||
		    !size || size > VDMA_MAX_STATE)
			return -EINVAL;
		migf->staging = vzalloc(size);
		return migf->staging ? n : -ENOMEM;
	}
	if (migf->end_seen)
		return -EINVAL;			/* nothing may follow END */
	if (migf->rec_got < rlen) {
		n = min(len, rlen - migf->rec_got);
		if (copy_from_user((u8 *)&migf->rec + migf->rec_got, buf, n))
			return -EFAULT;
		migf->rec_got += n;
		migf->data_got = 0;
		if (migf->rec_got < rlen)
			return n;
		if (le32_to_cpu(migf->rec.type) == VDMA_REC_END && !migf->rec.length) {
			migf->end_seen = true;
			migf->end_crc = le64_to_cpu(migf->rec.arg);
			return n;
		}
		if (le32_to_cpu(migf->rec.type) != VDMA_REC_DATA || !migf->rec.length ||
		    le32_to_cpu(migf->rec.length) > min_t(u64, VDMA_CHUNK, size) ||
		    le64_to_cpu(migf->rec.arg) > size - le32_to_cpu(migf->rec.length))
			return -EINVAL;
		return n;
	}
	n = min_t(size_t, len, le32_to_cpu(migf->rec.length) - migf->data_got);
	if (copy_from_user((u8 *)migf->staging + le64_to_cpu(migf->rec.arg) + migf->data_got,
			   buf, n))
		return -EFAULT;
	migf->data_got += n;
	if (migf->data_got == le32_to_cpu(migf->rec.length))
		migf->rec_got = 0;		/* next record */
	return n;
}

static ssize_t vdma_resume_write(struct file *filp, const char __user *buf, size_t len,
				 loff_t *ppos)
{
	struct vdma_migf *migf = filp->private_data;
	struct vdma_dev *vd = migf->vd;
	size_t done = 0;
	ssize_t ret = 0;

	if (ppos)
		return -ESPIPE;
	mutex_lock(&vd->state_mutex);
	if (migf->disabled)
		ret = -ENODEV;
	else if (migf->broken)
		ret = -EINVAL;
	while (!ret && done < len) {
		ssize_t n = vdma_take(migf, buf + done, len - done);

		if (n < 0) {
			migf->broken = n != -EFAULT;
			ret = n;
		} else {
			done += n;
		}
	}
	mutex_unlock(&vd->state_mutex);
	return ret ? ret : done;
}

static const struct file_operations vdma_resume_fops = {
	.owner = THIS_MODULE,
	.write = vdma_resume_write,
	.release = vdma_release_migf,
};

/* RESUMING -> STOP: a whole, intact stream becomes the device state; else nothing changes. */
static int vdma_load(struct vdma_dev *vd)
{
	struct vdma_migf *migf = vd->resuming;
	u64 size = le64_to_cpu(migf->hdr.state_size);
	unsigned long *dirty;

	if (migf->broken || !migf->end_seen || !migf->staging ||
	    vdma_crc(migf->staging, size) != migf->end_crc)
		return -EINVAL;
	dirty = bitmap_zalloc(vdma_nchunks(size), GFP_KERNEL);
	if (!dirty)
		return -ENOMEM;
	vfree(vd->state);
	bitmap_free(vd->dirty);
	vd->state = migf->staging;
	vd->state_size = size;
	vd->dirty = dirty;
	migf->staging = NULL;
	return 0;
}

/* -- the state machine ------------------------------------------------------------------ */

static struct file *vdma_open_migf(struct vdma_dev *vd, bool saving)
{
	struct vdma_migf *migf = kzalloc(sizeof(*migf), GFP_KERNEL_ACCOUNT);
	struct file *filp;

	if (!migf)
		return ERR_PTR(-ENOMEM);
	if (saving) {
		migf->out = kmalloc(sizeof(struct vdma_record) + VDMA_CHUNK, GFP_KERNEL_ACCOUNT);
		if (!migf->out) {
			kfree(migf);
			return ERR_PTR(-ENOMEM);
		}
	}
	filp = anon_inode_getfile("vfiod_dma_mig", saving ? &vdma_save_fops : &vdma_resume_fops,
				  migf, saving ? O_RDONLY : O_WRONLY);
	if (IS_ERR(filp)) {
		kfree(migf->out);
		kfree(migf);
		return filp;
	}
	stream_open(filp->f_inode, filp);
	migf->filp = filp;
	migf->vd = vd;
	get_device(&vd->vdev.device);
	if (saving) {
		/* every chunk goes in the initial pass: older dirt is moot */
		bitmap_zero(vd->dirty, vdma_nchunks(vd->state_size));
		vd->precopy_bytes = 0;
		vd->stopcopy_bytes = 0;
		vd->saving = migf;
	} else {
		vd->resuming = migf;
	}
	get_file(filp);			/* one reference for the caller, one kept here */
	return filp;
}

#define ARC(a, b) (cur == VFIO_DEVICE_STATE_##a && next == VFIO_DEVICE_STATE_##b)

/* One arc of the v2 state machine; vfio_mig_get_next_state() chooses which. */
static struct file *vdma_step(struct vdma_dev *vd, enum vfio_device_mig_state next)
{
	enum vfio_device_mig_state cur = vd->mig_state;

	if (ARC(RUNNING, PRE_COPY) || ARC(RUNNING_P2P, PRE_COPY_P2P) || ARC(STOP, STOP_COPY))
		return vdma_open_migf(vd, true);
	if (ARC(STOP, RESUMING))
		return vdma_open_migf(vd, false);
	if (ARC(RESUMING, STOP)) {
		int ret = vdma_load(vd);

		if (ret)
			return ERR_PTR(ret);
		vdma_disable_files(vd);
		return NULL;
	}
	if (ARC(STOP_COPY, STOP) || ARC(PRE_COPY, RUNNING) || ARC(PRE_COPY_P2P, RUNNING_P2P)) {
		vdma_disable_files(vd);
		return NULL;
	}
	/* the saving session goes on through these; the device only stops or starts */
	if (ARC(PRE_COPY_P2P, STOP_COPY) || ARC(PRE_COPY, PRE_COPY_P2P) ||
	    ARC(PRE_COPY_P2P, PRE_COPY) || ARC(RUNNING, RUNNING_P2P) ||
	    ARC(RUNNING_P2P, RUNNING) || ARC(RUNNING_P2P, STOP) || ARC(STOP, RUNNING_P2P))
		return NULL;
	WARN_ON(true);			/* vfio_mig_get_next_state() asks for no other arc */
	return ERR_PTR(-EINVAL);
}

static struct file *vdma_set_state(struct vfio_device *vdev,
				   enum vfio_device_mig_state target)
{
	struct vdma_dev *vd = container_of(vdev, struct vdma_dev, vdev);
	struct file *res = NULL;

	mutex_lock(&vd->state_mutex);
	while (vd->mig_state != target) {
		enum vfio_device_mig_state next;
		int ret = vfio_mig_get_next_state(vdev, vd->mig_state, target, &next);

		if (ret) {
			res = ERR_PTR(ret);
			break;
		}
		if (vd->fail_armed && vd->mig_state == vd->fail_from && next == vd->fail_to) {
			vd->fail_armed = false;		/* one shot */
			if (vd->fail_errno) {
				res = ERR_PTR(-vd->fail_errno);
			} else {
				vdma_disable_files(vd);
				vd->mig_state = VFIO_DEVICE_STATE_ERROR;
				res = ERR_PTR(-EIO);
			}
			break;
		}
		res = vdma_step(vd, next);
		if (IS_ERR(res))
			break;		/* a failed arc leaves the state where it was */
		vd->mig_state = next;
		if (WARN_ON(res && next != target)) {
			fput(res);
			res = ERR_PTR(-EINVAL);
			break;
		}
	}
	mutex_unlock(&vd->state_mutex);
	return res;
}

static int vdma_get_state(struct vfio_device *vdev, enum vfio_device_mig_state *state)
{
	struct vdma_dev *vd = container_of(vdev, struct vdma_dev, vdev);

	mutex_lock(&vd->state_mutex);
	*state = vd->mig_state;
	mutex_unlock(&vd->state_mutex);
	return 0;
}

/* What STOP_COPY would still send: all of it, or what a saving session owes, plus END. */
static int vdma_get_data_size(struct vfio_device *vdev, unsigned long *len)
{
	struct vdma_dev *vd = container_of(vdev, struct vdma_dev, vdev);
	u64 initial, dirty;

	mutex_lock(&vd->state_mutex);
	if (vd->saving && !vd->saving->disabled) {
		vdma_owed(vd->saving, &initial, &dirty);
		*len = initial + dirty + sizeof(struct vdma_record);
	} else {
		*len = sizeof(struct vdma_stream_header) +
		       vdma_nchunks(vd->state_size) * sizeof(struct vdma_record) +
		       vd->state_size + sizeof(struct vdma_record);
	}
	mutex_unlock(&vd->state_mutex);
	return 0;
}

const struct vfio_migration_ops vdma_mig_ops = {
	.migration_set_state = vdma_set_state,
	.migration_get_state = vdma_get_state,
	.migration_get_data_size = vdma_get_data_size,
};
