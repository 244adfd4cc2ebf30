/* SPDX-License-Identifier: GPL-2.0 */
/*
 * vfiod_dma - a mediated (mdev) test device for vfiod's real-kernel tier.
 * Shared definitions of core.c (device, sysfs), dma.c (DMA commands) and migration.c
 * (migration v2). native/vfiod_dma/README.md describes the device.
 */
#ifndef VFIOD_DMA_H
#define VFIOD_DMA_H

#include <linux/mutex.h>
#include <linux/types.h>
#include <linux/vfio.h>
#include <linux/workqueue.h>

#define VDMA_NAME		"vfiod_dma"
#define VDMA_MAX_STATE		(512UL << 20)
/* the unit of pre-copy dirty tracking and of a stream data record */
#define VDMA_CHUNK		(64UL << 10)

struct vdma_migf;

struct vdma_dev {
	struct vfio_device vdev;
	/*
	 * Guards everything below and every migration file's fields. Held across a whole
	 * DMA command and across a data fd read or write (copy_to_user under it is fine:
	 * no path takes mmap_lock and then this mutex).
	 */
	struct mutex state_mutex;
	enum vfio_device_mig_state mig_state;
	bool open;
	void *state;
	size_t state_size;
	unsigned long *dirty;	/* chunks changed since the saving session sent them */
	struct vdma_migf *saving;
	struct vdma_migf *resuming;
	/* the background writer (dma_rate): whole pages of [iova, iova + pages), in turn */
	struct delayed_work rate_work;
	unsigned int rate;	/* pages per second; 0: stopped */
	u8 rate_pattern;
	u64 rate_iova, rate_pages;
	u64 rate_written;	/* pages written since it started */
	u64 rate_base;		/* pages written when the clock last (re)started */
	unsigned long rate_start;	/* jiffies */
	int rate_error;		/* why it stopped by itself */
	u64 dma_commands;
	u64 dma_bytes;
	u64 dma_pages_pinned;
	/* bytes the last saving session handed out in pre-copy and in STOP_COPY */
	u64 precopy_bytes;
	u64 stopcopy_bytes;
	/* failure injection: the next time the arc fail_from -> fail_to is taken, it fails */
	bool fail_armed;
	enum vfio_device_mig_state fail_from, fail_to;
	int fail_errno;		/* 0: the device goes to ERROR instead (and the SET fails EIO) */
};

static inline size_t vdma_nchunks(size_t state_size)
{
	return DIV_ROUND_UP(state_size, VDMA_CHUNK);
}

/* Device running (DMA and state changes allowed), P2P-quiesced or not, saving or not. */
static inline bool vdma_running(enum vfio_device_mig_state s)
{
	return s == VFIO_DEVICE_STATE_RUNNING || s == VFIO_DEVICE_STATE_RUNNING_P2P ||
	       s == VFIO_DEVICE_STATE_PRE_COPY || s == VFIO_DEVICE_STATE_PRE_COPY_P2P;
}

/* migration.c */
extern const struct vfio_migration_ops vdma_mig_ops;
void vdma_disable_files(struct vdma_dev *vd);
u32 vdma_crc(const void *buf, size_t len);

/* dma.c */
int vdma_dma_command(struct vdma_dev *vd, const char *cmd);
int vdma_rate_command(struct vdma_dev *vd, const char *cmd);
void vdma_rate_work(struct work_struct *work);
void vdma_rate_stop(struct vdma_dev *vd);

#endif
