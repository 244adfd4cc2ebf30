// SPDX-License-Identifier: GPL-2.0
/*
 * vfiod_dma - a mediated (mdev) test device for vfiod's real-kernel tier.
 *
 * It sits on VFIO's emulated IOMMU, DMA-writes guest memory on command (dma.c) and
 * migrates a device state of configurable size with VFIO migration v2: STOP_COPY, P2P
 * and PRE_COPY (migration.c). Tests drive it through sysfs attributes (this file);
 * native/vfiod_dma/README.md documents them.
 */
#include <linux/bitmap.h>
#include <linux/mdev.h>
#include <linux/module.h>
#include <linux/vmalloc.h>

#include "vfiod_dma.h"

#define VDMA_DEFAULT_STATE	(1UL << 20)

/* -- device state ---------------------------------------------------------------------- */

static u64 vdma_next(u64 *x)
{
	/* xorshift64*: a cheap, reproducible byte stream for state_fill */
	*x ^= *x >> 12;
	*x ^= *x << 25;
	*x ^= *x >> 27;
	return *x * 0x2545F4914F6CDD1DULL;
}

/* Pseudo-random bytes over [off, off + len) of the state; the chunks touched turn dirty. */
static void vdma_fill(struct vdma_dev *vd, size_t off, size_t len, u64 seed)
{
	u64 x = seed ? seed : 0x9E3779B97F4A7C15ULL, word = 0;
	u8 *dst = (u8 *)vd->state + off;
	size_t i;

	for (i = 0; i < len; i++) {
		if (!(i % 8))
			word = vdma_next(&x);
		dst[i] = word >> (8 * (i % 8));
	}
	bitmap_set(vd->dirty, off / VDMA_CHUNK, (off + len - 1) / VDMA_CHUNK - off / VDMA_CHUNK + 1);
}

/* A new size keeps the common prefix; new bytes are zero. */
static int vdma_resize(struct vdma_dev *vd, size_t size)
{
	void *state = vzalloc(size);
	unsigned long *dirty = bitmap_zalloc(vdma_nchunks(size), GFP_KERNEL);

	if (!state || !dirty) {
		vfree(state);
		bitmap_free(dirty);
		return -ENOMEM;
	}
	if (vd->state)
		memcpy(state, vd->state, min(size, vd->state_size));
	vfree(vd->state);
	bitmap_free(vd->dirty);
	vd->state = state;
	vd->dirty = dirty;
	vd->state_size = size;
	return 0;
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
	int ret;

	mutex_lock(&vd->state_mutex);
	ret = vdma_dma_command(vd, buf);
	mutex_unlock(&vd->state_mutex);
	return ret ? ret : count;
}
static DEVICE_ATTR_WO(dma_write);

static ssize_t dma_rate_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	struct vdma_dev *vd = vdma_from_dev(dev);
	ssize_t n;

	mutex_lock(&vd->state_mutex);
	n = sysfs_emit(buf, "rate %u written %llu error %d\n", vd->rate, vd->rate_written,
		       vd->rate_error);
	mutex_unlock(&vd->state_mutex);
	return n;
}

static ssize_t dma_rate_store(struct device *dev, struct device_attribute *attr,
			      const char *buf, size_t count)
{
	int ret = vdma_rate_command(vdma_from_dev(dev), buf);

	return ret ? ret : count;
}
static DEVICE_ATTR_RW(dma_rate);

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

static ssize_t state_size_store(struct device *dev, struct device_attribute *attr,
				const char *buf, size_t count)
{
	struct vdma_dev *vd = vdma_from_dev(dev);
	unsigned long size;
	int ret;

	ret = kstrtoul(buf, 0, &size);
	if (ret)
		return ret;
	if (!size || size > VDMA_MAX_STATE)
		return -EINVAL;
	mutex_lock(&vd->state_mutex);
	/* not while saving: the stream announced its size in its header */
	if (vd->mig_state != VFIO_DEVICE_STATE_RUNNING &&
	    vd->mig_state != VFIO_DEVICE_STATE_RUNNING_P2P)
		ret = -EBUSY;
	else
		ret = vdma_resize(vd, size);
	mutex_unlock(&vd->state_mutex);
	return ret ? ret : count;
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
	if (!vdma_running(vd->mig_state))
		ret = -EBUSY;
	else if (!len || off >= vd->state_size || len > vd->state_size - off)
		ret = -EINVAL;
	else
		vdma_fill(vd, off, len, seed);
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

static ssize_t mig_stats_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	struct vdma_dev *vd = vdma_from_dev(dev);
	ssize_t n;

	mutex_lock(&vd->state_mutex);
	n = sysfs_emit(buf, "precopy_bytes %llu stopcopy_bytes %llu\n", vd->precopy_bytes,
		       vd->stopcopy_bytes);
	mutex_unlock(&vd->state_mutex);
	return n;
}
static DEVICE_ATTR_RO(mig_stats);

static ssize_t fail_arc_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	struct vdma_dev *vd = vdma_from_dev(dev);
	ssize_t n;

	mutex_lock(&vd->state_mutex);
	if (!vd->fail_armed)
		n = sysfs_emit(buf, "none\n");
	else if (vd->fail_errno)
		n = sysfs_emit(buf, "%u %u %d\n", vd->fail_from, vd->fail_to, vd->fail_errno);
	else
		n = sysfs_emit(buf, "%u %u error\n", vd->fail_from, vd->fail_to);
	mutex_unlock(&vd->state_mutex);
	return n;
}

/* "<from> <to> <errno>" or "<from> <to> error" (states as numbers), or "none" */
static ssize_t fail_arc_store(struct device *dev, struct device_attribute *attr,
			      const char *buf, size_t count)
{
	struct vdma_dev *vd = vdma_from_dev(dev);
	unsigned int from, to;
	char how[8];
	int err = 0;

	if (sysfs_streq(buf, "none")) {
		mutex_lock(&vd->state_mutex);
		vd->fail_armed = false;
		mutex_unlock(&vd->state_mutex);
		return count;
	}
	if (sscanf(buf, "%u %u %7s", &from, &to, how) != 3 ||
	    !from || !to || from > VFIO_DEVICE_STATE_PRE_COPY_P2P ||
	    to > VFIO_DEVICE_STATE_PRE_COPY_P2P || from == to)
		return -EINVAL;
	if (strcmp(how, "error") && (kstrtoint(how, 0, &err) || err <= 0 || err >= MAX_ERRNO))
		return -EINVAL;
	mutex_lock(&vd->state_mutex);
	vd->fail_armed = true;
	vd->fail_from = from;
	vd->fail_to = to;
	vd->fail_errno = err;
	mutex_unlock(&vd->state_mutex);
	return count;
}
static DEVICE_ATTR_RW(fail_arc);

static struct attribute *vdma_attrs[] = {
	&dev_attr_dma_write.attr,
	&dev_attr_dma_stats.attr,
	&dev_attr_dma_rate.attr,
	&dev_attr_state_size.attr,
	&dev_attr_state_fill.attr,
	&dev_attr_state_checksum.attr,
	&dev_attr_mig_state.attr,
	&dev_attr_mig_stats.attr,
	&dev_attr_fail_arc.attr,
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

	vdma_rate_stop(vd);		/* no DMA without a container */
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
	int ret = vdma_resize(vd, VDMA_DEFAULT_STATE);

	if (ret)
		return ret;
	mutex_init(&vd->state_mutex);
	INIT_DELAYED_WORK(&vd->rate_work, vdma_rate_work);
	vd->mig_state = VFIO_DEVICE_STATE_RUNNING;
	vdev->migration_flags = VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P |
				VFIO_MIGRATION_PRE_COPY;
	vdev->mig_ops = &vdma_mig_ops;
	return 0;
}

static void vdma_release(struct vfio_device *vdev)
{
	struct vdma_dev *vd = container_of(vdev, struct vdma_dev, vdev);

	cancel_delayed_work_sync(&vd->rate_work);
	mutex_destroy(&vd->state_mutex);
	vfree(vd->state);
	bitmap_free(vd->dirty);
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
