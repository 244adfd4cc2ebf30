// SPDX-License-Identifier: GPL-2.0
/*
 * vfiod_dma - a mediated (mdev) test device for vfiod's real-kernel tier.
 *
 * It sits on VFIO's emulated IOMMU, DMA-writes guest memory on command and migrates a
 * device state of configurable size with VFIO migration v2 (STOP_COPY and P2P).
 * Tests drive it through sysfs attributes; native/vfiod_dma/README.md documents them.
 *
 * Why the DMA path looks the way it does: with only emulated-IOMMU groups in a type1
 * container, type1 reports dirty exactly the pages written through vfio_dma_rw() and
 * the pages pinned by the driver since the last GET_BITMAP; a page still pinned at a GET
 * is reported again on the next one. So every write unpins before it returns, and the
 * bitmap holds exactly the written pages.
 */
#include <linux/anon_inodes.h>
#include <linux/crc32.h>
#include <linux/file.h>
#include <linux/highmem.h>
#include <linux/iommu.h>
#include <linux/mdev.h>
#include <linux/module.h>
#include <linux/vfio.h>
#include <linux/vmalloc.h>
#include <linux/workqueue.h>

#define VDMA_NAME		"vfiod_dma"
#define VDMA_MAGIC		0x414d44444f494656ULL	/* "VFIODDMA" little-endian */
#define VDMA_VERSION		1
#define VDMA_DEFAULT_STATE	(1UL << 20)
#define VDMA_MAX_STATE		(512UL << 20)
#define VDMA_MAX_RANGES		64
#define VDMA_RW_CHUNK		(64UL << 10)

/* The head of every migration stream; the state bytes follow. */
struct vdma_stream_header {
	__le64 magic;
	__le32 version;
	__le32 crc;		/* crc32_le(0, state, state_size) */
	__le64 state_size;
};

struct vdma_dev;

/* A migration data fd: the saving side reads header + state, the resuming side writes. */
struct vdma_migf {
	struct file *filp;
	struct mutex lock;	/* pos, received, disabled, staging */
	bool disabled;
	struct vdma_dev *vd;
	struct vdma_stream_header hdr;
	size_t pos;		/* saving: bytes read so far */
	size_t received;	/* resuming: bytes written so far */
	void *staging;		/* resuming: the incoming state, allocated once the header is in */
};

struct vdma_dev {
	struct vfio_device vdev;
	/* state_mutex guards everything below; held across a whole DMA command */
	struct mutex state_mutex;
	enum vfio_device_mig_state mig_state;
	bool open;
	void *state;
	size_t state_size;
	struct vdma_migf *saving;
	struct vdma_migf *resuming;
	u64 dma_commands;
	u64 dma_bytes;
	u64 dma_pages_pinned;
};

/* -- device state -------------------------------------------------------------------- */

static u64 vdma_next(u64 *x)
{
	/* xorshift64*: a cheap, reproducible byte stream for state_fill */
	*x ^= *x >> 12;
	*x ^= *x << 25;
	*x ^= *x >> 27;
	return *x * 0x2545F4914F6CDD1DULL;
}

static void vdma_fill(u8 *dst, size_t len, u64 seed)
{
	u64 x = seed ? seed : 0x9E3779B97F4A7C15ULL, word = 0;
	size_t i;

	for (i = 0; i < len; i++) {
		if (!(i % 8))
			word = vdma_next(&x);
		dst[i] = word >> (8 * (i % 8));
	}
}

static u32 vdma_crc(const void *buf, size_t len)
{
	return crc32_le(0, buf, len);
}

static bool vdma_dma_allowed(enum vfio_device_mig_state s)
{
	/* a stopped device neither does DMA nor changes its state */
	return s == VFIO_DEVICE_STATE_RUNNING || s == VFIO_DEVICE_STATE_RUNNING_P2P;
}

/* -- migration data fds -------------------------------------------------------------- */

static void vdma_disable_migf(struct vdma_migf *migf)
{
	mutex_lock(&migf->lock);
	migf->disabled = true;
	vfree(migf->staging);
	migf->staging = NULL;
	mutex_unlock(&migf->lock);
}

/* Ends both data sessions; their fds then read or write ENODEV. */
static void vdma_disable_files(struct vdma_dev *vd)
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

static int vdma_release_migf(struct inode *inode, struct file *filp)
{
	struct vdma_migf *migf = filp->private_data;

	vdma_disable_migf(migf);
	mutex_destroy(&migf->lock);
	kfree(migf);
	return 0;
}

static ssize_t vdma_save_read(struct file *filp, char __user *buf, size_t len, loff_t *ppos)
{
	struct vdma_migf *migf = filp->private_data;
	size_t hlen = sizeof(migf->hdr), total, done = 0;
	ssize_t ret;

	if (ppos)
		return -ESPIPE;
	mutex_lock(&migf->lock);
	if (migf->disabled) {
		ret = -ENODEV;
		goto out;
	}
	/* the device is in STOP_COPY: its state cannot change while this fd is enabled */
	total = hlen + le64_to_cpu(migf->hdr.state_size);
	len = min(len, total - migf->pos);
	while (done < len) {
		size_t at = migf->pos + done, n;
		const void *src;

		if (at < hlen) {
			src = (const u8 *)&migf->hdr + at;
			n = min(len - done, hlen - at);
		} else {
			src = (const u8 *)migf->vd->state + (at - hlen);
			n = len - done;
		}
		if (copy_to_user(buf + done, src, n)) {
			ret = -EFAULT;
			goto out;
		}
		done += n;
	}
	migf->pos += done;
	ret = done;
out:
	mutex_unlock(&migf->lock);
	return ret;
}

static const struct file_operations vdma_save_fops = {
	.owner = THIS_MODULE,
	.read = vdma_save_read,
	.release = vdma_release_migf,
};

static ssize_t vdma_resume_write(struct file *filp, const char __user *buf, size_t len,
				 loff_t *ppos)
{
	struct vdma_migf *migf = filp->private_data;
	size_t hlen = sizeof(migf->hdr), done = 0;
	ssize_t ret;

	if (ppos)
		return -ESPIPE;
	mutex_lock(&migf->lock);
	if (migf->disabled) {
		ret = -ENODEV;
		goto out;
	}
	while (done < len) {
		size_t at = migf->received, n;
		u64 size;

		if (at < hlen) {
			n = min(len - done, hlen - at);
			if (copy_from_user((u8 *)&migf->hdr + at, buf + done, n)) {
				ret = -EFAULT;
				goto out;
			}
			migf->received += n;
			done += n;
			if (migf->received < hlen)
				continue;
			size = le64_to_cpu(migf->hdr.state_size);
			if (le64_to_cpu(migf->hdr.magic) != VDMA_MAGIC ||
			    le32_to_cpu(migf->hdr.version) != VDMA_VERSION ||
			    !size || size > VDMA_MAX_STATE) {
				ret = -EINVAL;
				goto out;
			}
			migf->staging = vmalloc(size);
			if (!migf->staging) {
				ret = -ENOMEM;
				goto out;
			}
			continue;
		}
		size = le64_to_cpu(migf->hdr.state_size);
		if (at - hlen >= size) {
			ret = -EINVAL;		/* more bytes than the header announced */
			goto out;
		}
		n = min(len - done, size - (at - hlen));
		if (copy_from_user((u8 *)migf->staging + (at - hlen), buf + done, n)) {
			ret = -EFAULT;
			goto out;
		}
		migf->received += n;
		done += n;
	}
	ret = done;
out:
	mutex_unlock(&migf->lock);
	return ret;
}

static const struct file_operations vdma_resume_fops = {
	.owner = THIS_MODULE,
	.write = vdma_resume_write,
	.release = vdma_release_migf,
};

static struct vdma_migf *vdma_new_migf(struct vdma_dev *vd, const struct file_operations *fops,
				       int flags)
{
	struct vdma_migf *migf = kzalloc(sizeof(*migf), GFP_KERNEL_ACCOUNT);

	if (!migf)
		return ERR_PTR(-ENOMEM);
	migf->filp = anon_inode_getfile("vfiod_dma_mig", fops, migf, flags);
	if (IS_ERR(migf->filp)) {
		struct file *err = migf->filp;

		kfree(migf);
		return ERR_CAST(err);
	}
	stream_open(migf->filp->f_inode, migf->filp);
	mutex_init(&migf->lock);
	migf->vd = vd;
	return migf;
}

/* RESUMING -> STOP: the received stream becomes the device state, or nothing changes. */
static int vdma_load(struct vdma_dev *vd)
{
	struct vdma_migf *migf = vd->resuming;
	size_t hlen = sizeof(migf->hdr), size;
	int ret = 0;

	mutex_lock(&migf->lock);
	size = le64_to_cpu(migf->hdr.state_size);
	if (migf->received < hlen || migf->received != hlen + size || !migf->staging ||
	    vdma_crc(migf->staging, size) != le32_to_cpu(migf->hdr.crc)) {
		ret = -EINVAL;
		goto out;
	}
	vfree(vd->state);
	vd->state = migf->staging;
	vd->state_size = size;
	migf->staging = NULL;
out:
	mutex_unlock(&migf->lock);
	return ret;
}

/* One arc of the v2 state machine; vfio_mig_get_next_state() chooses which. */
static struct file *vdma_step(struct vdma_dev *vd, enum vfio_device_mig_state next)
{
	enum vfio_device_mig_state cur = vd->mig_state;
	struct vdma_migf *migf;

	if (cur == VFIO_DEVICE_STATE_STOP && next == VFIO_DEVICE_STATE_STOP_COPY) {
		migf = vdma_new_migf(vd, &vdma_save_fops, O_RDONLY);
		if (IS_ERR(migf))
			return ERR_CAST(migf);
		migf->hdr.magic = cpu_to_le64(VDMA_MAGIC);
		migf->hdr.version = cpu_to_le32(VDMA_VERSION);
		migf->hdr.crc = cpu_to_le32(vdma_crc(vd->state, vd->state_size));
		migf->hdr.state_size = cpu_to_le64(vd->state_size);
		vd->saving = migf;
		get_file(migf->filp);		/* one reference for the caller, one kept */
		return migf->filp;
	}
	if (cur == VFIO_DEVICE_STATE_STOP && next == VFIO_DEVICE_STATE_RESUMING) {
		migf = vdma_new_migf(vd, &vdma_resume_fops, O_WRONLY);
		if (IS_ERR(migf))
			return ERR_CAST(migf);
		vd->resuming = migf;
		get_file(migf->filp);
		return migf->filp;
	}
	if (cur == VFIO_DEVICE_STATE_RESUMING && next == VFIO_DEVICE_STATE_STOP) {
		int ret = vdma_load(vd);

		if (ret)
			return ERR_PTR(ret);
		vdma_disable_files(vd);
		return NULL;
	}
	if (cur == VFIO_DEVICE_STATE_STOP_COPY && next == VFIO_DEVICE_STATE_STOP) {
		vdma_disable_files(vd);
		return NULL;
	}
	if ((cur == VFIO_DEVICE_STATE_RUNNING && next == VFIO_DEVICE_STATE_RUNNING_P2P) ||
	    (cur == VFIO_DEVICE_STATE_RUNNING_P2P && next == VFIO_DEVICE_STATE_RUNNING) ||
	    (cur == VFIO_DEVICE_STATE_RUNNING_P2P && next == VFIO_DEVICE_STATE_STOP) ||
	    (cur == VFIO_DEVICE_STATE_STOP && next == VFIO_DEVICE_STATE_RUNNING_P2P))
		return NULL;		/* DMA is allowed or refused by mig_state alone */
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

static int vdma_get_data_size(struct vfio_device *vdev, unsigned long *len)
{
	struct vdma_dev *vd = container_of(vdev, struct vdma_dev, vdev);

	mutex_lock(&vd->state_mutex);
	*len = sizeof(struct vdma_stream_header) + vd->state_size;
	mutex_unlock(&vd->state_mutex);
	return 0;
}

static const struct vfio_migration_ops vdma_mig_ops = {
	.migration_set_state = vdma_set_state,
	.migration_get_state = vdma_get_state,
	.migration_get_data_size = vdma_get_data_size,
};

/* -- DMA ------------------------------------------------------------------------------ */

struct vdma_range {
	u64 iova;
	u64 len;
};

struct vdma_job {
	struct work_struct work;
	struct vdma_dev *vd;
	bool pin;		/* vfio_pin_pages + CPU write + unpin, else vfio_dma_rw */
	u8 pattern;
	unsigned int nr;
	struct vdma_range ranges[VDMA_MAX_RANGES];
	int ret;
	u64 bytes;
	u64 pinned;
};

static int vdma_write_rw(struct vdma_job *job, const struct vdma_range *r, void *buf)
{
	u64 off = 0;

	while (off < r->len) {
		size_t n = min_t(u64, r->len - off, VDMA_RW_CHUNK);
		int ret = vfio_dma_rw(&job->vd->vdev, r->iova + off, buf, n, true);

		if (ret)
			return ret;
		off += n;
		job->bytes += n;
	}
	return 0;
}

static int vdma_write_pinned(struct vdma_job *job, const struct vdma_range *r)
{
	u64 at = r->iova, end = r->iova + r->len;

	while (at < end) {
		dma_addr_t page_iova = ALIGN_DOWN(at, PAGE_SIZE);
		size_t in_page = at - page_iova, n = min_t(u64, end - at, PAGE_SIZE - in_page);
		struct page *page;
		void *va;
		int ret;

		ret = vfio_pin_pages(&job->vd->vdev, page_iova, 1, IOMMU_READ | IOMMU_WRITE, &page);
		if (ret < 0)
			return ret;
		if (ret != 1)
			return -EFAULT;
		job->pinned++;
		va = kmap_local_page(page);
		memset(va + in_page, job->pattern, n);
		kunmap_local(va);
		/* unpinned at once: a page pinned at the next GET_BITMAP would be reported again */
		vfio_unpin_pages(&job->vd->vdev, page_iova, 1);
		at += n;
		job->bytes += n;
	}
	return 0;
}

/* Runs in a kworker: vfio_dma_rw() then borrows the mm of the mapping's owner. */
static void vdma_job_run(struct work_struct *work)
{
	struct vdma_job *job = container_of(work, struct vdma_job, work);
	void *buf = NULL;
	unsigned int i;

	if (!job->pin) {
		buf = kmalloc(VDMA_RW_CHUNK, GFP_KERNEL);
		if (!buf) {
			job->ret = -ENOMEM;
			return;
		}
		memset(buf, job->pattern, VDMA_RW_CHUNK);
	}
	for (i = 0; i < job->nr && !job->ret; i++)
		job->ret = job->pin ? vdma_write_pinned(job, &job->ranges[i]) :
				      vdma_write_rw(job, &job->ranges[i], buf);
	kfree(buf);
}

/* "<rw|pin> <pattern> <iova>:<len> [<iova>:<len> ...]" */
static int vdma_parse_job(struct vdma_job *job, const char *cmd)
{
	char mode[4];
	unsigned int pattern;
	int used;

	if (sscanf(cmd, "%3s %i%n", mode, &pattern, &used) != 2 || pattern > 0xff)
		return -EINVAL;
	if (!strcmp(mode, "pin"))
		job->pin = true;
	else if (strcmp(mode, "rw"))
		return -EINVAL;
	job->pattern = pattern;
	cmd += used;
	for (;;) {
		unsigned long long iova, len;

		cmd = skip_spaces(cmd);
		if (!*cmd)
			break;
		if (job->nr == VDMA_MAX_RANGES ||
		    sscanf(cmd, "%lli:%lli%n", &iova, &len, &used) != 2 ||
		    !len || iova + len < iova)
			return -EINVAL;
		job->ranges[job->nr].iova = iova;
		job->ranges[job->nr].len = len;
		job->nr++;
		cmd += used;
	}
	return job->nr ? 0 : -EINVAL;
}

/* -- sysfs control interface (native/vfiod_dma/README.md) ----------------------------- */

static struct vdma_dev *vdma_from_dev(struct device *dev)
{
	return dev_get_drvdata(dev);
}

static ssize_t dma_write_store(struct device *dev, struct device_attribute *attr,
			       const char *buf, size_t count)
{
	struct vdma_dev *vd = vdma_from_dev(dev);
	struct vdma_job *job = kzalloc(sizeof(*job), GFP_KERNEL);
	int ret;

	if (!job)
		return -ENOMEM;
	ret = vdma_parse_job(job, buf);
	if (ret)
		goto out;
	job->vd = vd;
	mutex_lock(&vd->state_mutex);
	if (!vd->open)
		ret = -ENODEV;		/* no container: nothing to DMA into */
	else if (!vdma_dma_allowed(vd->mig_state))
		ret = -EBUSY;
	if (!ret) {
		INIT_WORK(&job->work, vdma_job_run);
		queue_work(system_unbound_wq, &job->work);
		flush_work(&job->work);
		ret = job->ret;
		vd->dma_commands++;
		vd->dma_bytes += job->bytes;
		vd->dma_pages_pinned += job->pinned;
	}
	mutex_unlock(&vd->state_mutex);
out:
	kfree(job);
	return ret ? ret : count;
}
static DEVICE_ATTR_WO(dma_write);

static ssize_t dma_stats_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	struct vdma_dev *vd = vdma_from_dev(dev);
	ssize_t n;

	mutex_lock(&vd->state_mutex);
	n = sysfs_emit(buf, "commands %llu bytes %llu pinned %llu\n", vd->dma_commands,
		       vd->dma_bytes, vd->dma_pages_pinned);
	mutex_unlock(&vd->state_mutex);
	return n;
}
static DEVICE_ATTR_RO(dma_stats);

static ssize_t state_size_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	struct vdma_dev *vd = vdma_from_dev(dev);
	ssize_t n;

	mutex_lock(&vd->state_mutex);
	n = sysfs_emit(buf, "%zu\n", vd->state_size);
	mutex_unlock(&vd->state_mutex);
	return n;
}

/* A new size keeps the common prefix; new bytes are zero. */
static ssize_t state_size_store(struct device *dev, struct device_attribute *attr,
				const char *buf, size_t count)
{
	struct vdma_dev *vd = vdma_from_dev(dev);
	unsigned long size;
	void *state;
	int ret;

	ret = kstrtoul(buf, 0, &size);
	if (ret)
		return ret;
	if (!size || size > VDMA_MAX_STATE)
		return -EINVAL;
	state = vzalloc(size);
	if (!state)
		return -ENOMEM;
	mutex_lock(&vd->state_mutex);
	if (!vdma_dma_allowed(vd->mig_state)) {
		mutex_unlock(&vd->state_mutex);
		vfree(state);
		return -EBUSY;
	}
	memcpy(state, vd->state, min(size, vd->state_size));
	swap(state, vd->state);
	vd->state_size = size;
	mutex_unlock(&vd->state_mutex);
	vfree(state);
	return count;
}
static DEVICE_ATTR_RW(state_size);

/* "<seed> [<offset> <length>]": pseudo-random bytes from seed over the range (default all) */
static ssize_t state_fill_store(struct device *dev, struct device_attribute *attr,
				const char *buf, size_t count)
{
	struct vdma_dev *vd = vdma_from_dev(dev);
	unsigned long long seed, off = 0, len = 0;
	int got = sscanf(buf, "%lli %lli %lli", &seed, &off, &len);
	int ret = 0;

	if (got != 1 && got != 3)
		return -EINVAL;
	mutex_lock(&vd->state_mutex);
	if (got == 1)
		len = vd->state_size;
	if (!vdma_dma_allowed(vd->mig_state))
		ret = -EBUSY;
	else if (!len || off >= vd->state_size || len > vd->state_size - off)
		ret = -EINVAL;
	else
		vdma_fill((u8 *)vd->state + off, len, seed);
	mutex_unlock(&vd->state_mutex);
	return ret ? ret : count;
}
static DEVICE_ATTR_WO(state_fill);

static ssize_t state_checksum_show(struct device *dev, struct device_attribute *attr,
				   char *buf)
{
	struct vdma_dev *vd = vdma_from_dev(dev);
	ssize_t n;

	mutex_lock(&vd->state_mutex);
	n = sysfs_emit(buf, "%08x\n", vdma_crc(vd->state, vd->state_size));
	mutex_unlock(&vd->state_mutex);
	return n;
}
static DEVICE_ATTR_RO(state_checksum);

static ssize_t mig_state_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	struct vdma_dev *vd = vdma_from_dev(dev);
	ssize_t n;

	mutex_lock(&vd->state_mutex);
	n = sysfs_emit(buf, "%u\n", vd->mig_state);
	mutex_unlock(&vd->state_mutex);
	return n;
}
static DEVICE_ATTR_RO(mig_state);

static struct attribute *vdma_attrs[] = {
	&dev_attr_dma_write.attr,
	&dev_attr_dma_stats.attr,
	&dev_attr_state_size.attr,
	&dev_attr_state_fill.attr,
	&dev_attr_state_checksum.attr,
	&dev_attr_mig_state.attr,
	NULL,
};

static const struct attribute_group vdma_attr_group = {
	.name = "control",
	.attrs = vdma_attrs,
};

static const struct attribute_group *vdma_attr_groups[] = {
	&vdma_attr_group,
	NULL,
};

/* -- vfio_device_ops ------------------------------------------------------------------ */

static int vdma_open(struct vfio_device *vdev)
{
	struct vdma_dev *vd = container_of(vdev, struct vdma_dev, vdev);

	mutex_lock(&vd->state_mutex);
	vd->open = true;
	mutex_unlock(&vd->state_mutex);
	return 0;
}

/* Closing ends any data session and returns the device to RUNNING. */
static void vdma_close(struct vfio_device *vdev)
{
	struct vdma_dev *vd = container_of(vdev, struct vdma_dev, vdev);

	mutex_lock(&vd->state_mutex);
	vdma_disable_files(vd);
	vd->mig_state = VFIO_DEVICE_STATE_RUNNING;
	vd->open = false;
	mutex_unlock(&vd->state_mutex);
}

/*
 * type1 calls this before unmapping a range with pages still pinned. Pins live only
 * inside a DMA command, which holds state_mutex: waiting for it is enough.
 */
static void vdma_dma_unmap(struct vfio_device *vdev, u64 iova, u64 length)
{
	struct vdma_dev *vd = container_of(vdev, struct vdma_dev, vdev);

	mutex_lock(&vd->state_mutex);
	mutex_unlock(&vd->state_mutex);
}

static long vdma_ioctl(struct vfio_device *vdev, unsigned int cmd, unsigned long arg)
{
	struct vdma_dev *vd = container_of(vdev, struct vdma_dev, vdev);
	void __user *uarg = (void __user *)arg;

	switch (cmd) {
	case VFIO_DEVICE_GET_INFO: {
		struct vfio_device_info info;
		size_t minsz = offsetofend(struct vfio_device_info, num_irqs);

		if (copy_from_user(&info, uarg, minsz))
			return -EFAULT;
		if (info.argsz < minsz)
			return -EINVAL;
		info.flags = VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET;
		info.num_regions = VFIO_PCI_NUM_REGIONS;
		info.num_irqs = VFIO_PCI_NUM_IRQS;
		return copy_to_user(uarg, &info, minsz) ? -EFAULT : 0;
	}
	case VFIO_DEVICE_GET_REGION_INFO: {
		/* no BARs and no config space: everything a test needs is in sysfs */
		struct vfio_region_info info;
		size_t minsz = offsetofend(struct vfio_region_info, offset);

		if (copy_from_user(&info, uarg, minsz))
			return -EFAULT;
		if (info.argsz < minsz || info.index >= VFIO_PCI_NUM_REGIONS)
			return -EINVAL;
		info.flags = 0;
		info.cap_offset = 0;
		info.size = 0;
		info.offset = 0;
		return copy_to_user(uarg, &info, minsz) ? -EFAULT : 0;
	}
	case VFIO_DEVICE_GET_IRQ_INFO: {
		struct vfio_irq_info info;
		size_t minsz = offsetofend(struct vfio_irq_info, count);

		if (copy_from_user(&info, uarg, minsz))
			return -EFAULT;
		if (info.argsz < minsz || info.index >= VFIO_PCI_NUM_IRQS)
			return -EINVAL;
		info.flags = 0;
		info.count = 0;
		return copy_to_user(uarg, &info, minsz) ? -EFAULT : 0;
	}
	case VFIO_DEVICE_RESET:
		/* ends migration, keeps the state bytes (they are the device's memory) */
		mutex_lock(&vd->state_mutex);
		vdma_disable_files(vd);
		vd->mig_state = VFIO_DEVICE_STATE_RUNNING;
		mutex_unlock(&vd->state_mutex);
		return 0;
	}
	return -ENOTTY;
}

static int vdma_init(struct vfio_device *vdev)
{
	struct vdma_dev *vd = container_of(vdev, struct vdma_dev, vdev);

	vd->state = vzalloc(VDMA_DEFAULT_STATE);
	if (!vd->state)
		return -ENOMEM;
	vd->state_size = VDMA_DEFAULT_STATE;
	mutex_init(&vd->state_mutex);
	vd->mig_state = VFIO_DEVICE_STATE_RUNNING;
	vdev->migration_flags = VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P;
	vdev->mig_ops = &vdma_mig_ops;
	return 0;
}

static void vdma_release(struct vfio_device *vdev)
{
	struct vdma_dev *vd = container_of(vdev, struct vdma_dev, vdev);

	mutex_destroy(&vd->state_mutex);
	vfree(vd->state);
}

static const struct vfio_device_ops vdma_dev_ops = {
	.name = "vfio-" VDMA_NAME,
	.init = vdma_init,
	.release = vdma_release,
	.open_device = vdma_open,
	.close_device = vdma_close,
	.ioctl = vdma_ioctl,
	.dma_unmap = vdma_dma_unmap,
	.bind_iommufd = vfio_iommufd_emulated_bind,
	.unbind_iommufd = vfio_iommufd_emulated_unbind,
	.attach_ioas = vfio_iommufd_emulated_attach_ioas,
	.detach_ioas = vfio_iommufd_emulated_detach_ioas,
};

/* -- mdev parent and driver ----------------------------------------------------------- */

static int vdma_probe(struct mdev_device *mdev)
{
	struct vdma_dev *vd = vfio_alloc_device(vdma_dev, vdev, &mdev->dev, &vdma_dev_ops);
	int ret;

	if (IS_ERR(vd))
		return PTR_ERR(vd);
	dev_set_drvdata(&mdev->dev, vd);
	ret = vfio_register_emulated_iommu_dev(&vd->vdev);
	if (ret) {
		vfio_put_device(&vd->vdev);
		return ret;
	}
	return 0;
}

static void vdma_remove(struct mdev_device *mdev)
{
	struct vdma_dev *vd = dev_get_drvdata(&mdev->dev);

	vfio_unregister_group_dev(&vd->vdev);
	vfio_put_device(&vd->vdev);
}

static ssize_t vdma_description(struct mdev_type *mtype, char *buf)
{
	return sysfs_emit(buf, "DMA writes on command, migratable state up to %lu MiB\n",
			  VDMA_MAX_STATE >> 20);
}

static struct mdev_driver vdma_driver = {
	.device_api = VFIO_DEVICE_API_PCI_STRING,
	.max_instances = 8,
	.driver = {
		.name = VDMA_NAME,
		.owner = THIS_MODULE,
		.mod_name = KBUILD_MODNAME,
		.dev_groups = vdma_attr_groups,
	},
	.probe = vdma_probe,
	.remove = vdma_remove,
	.show_description = vdma_description,
};

static struct mdev_type vdma_type = {
	.sysfs_name = "dev",
	.pretty_name = VDMA_NAME,
};

static struct mdev_type *vdma_types[] = { &vdma_type };

static struct {
	const struct class *class;
	struct device *parent_dev;
	struct mdev_parent parent;
} vdma_host;

static int __init vdma_module_init(void)
{
	int ret = mdev_register_driver(&vdma_driver);

	if (ret)
		return ret;
	vdma_host.class = class_create(VDMA_NAME);
	if (IS_ERR(vdma_host.class)) {
		ret = PTR_ERR(vdma_host.class);
		goto err_driver;
	}
	/* a class device, so the mdev types are named "vfiod_dma-dev" */
	vdma_host.parent_dev = device_create(vdma_host.class, NULL, 0, NULL, VDMA_NAME);
	if (IS_ERR(vdma_host.parent_dev)) {
		ret = PTR_ERR(vdma_host.parent_dev);
		goto err_class;
	}
	ret = mdev_register_parent(&vdma_host.parent, vdma_host.parent_dev, &vdma_driver,
				   vdma_types, ARRAY_SIZE(vdma_types));
	if (ret)
		goto err_device;
	return 0;

err_device:
	device_unregister(vdma_host.parent_dev);
err_class:
	class_destroy(vdma_host.class);
err_driver:
	mdev_unregister_driver(&vdma_driver);
	return ret;
}

static void __exit vdma_module_exit(void)
{
	mdev_unregister_parent(&vdma_host.parent);
	device_unregister(vdma_host.parent_dev);
	class_destroy(vdma_host.class);
	mdev_unregister_driver(&vdma_driver);
}

module_init(vdma_module_init);
module_exit(vdma_module_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("vfiod's mdev test device: DMA on command, migratable state");
