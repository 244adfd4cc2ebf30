// SPDX-License-Identifier: GPL-2.0
/*
 * vfiod_dma DMA commands: write a byte pattern over IOVA ranges, the way a device would.
 *
 * Why it looks the way it does: with only emulated-IOMMU groups in a type1 container,
 * type1 reports dirty exactly the pages written through vfio_dma_rw() and the pages the
 * driver pinned since the last GET_BITMAP; a page still pinned at a GET is reported again
 * on the next one. So every write unpins before the command returns, and the bitmap
 * holds exactly the written pages.
 */
#include <linux/highmem.h>
#include <linux/iommu.h>
#include <linux/slab.h>
#include <linux/string.h>
#include <linux/workqueue.h>

#include "vfiod_dma.h"

#define VDMA_MAX_RANGES		64
#define VDMA_RW_CHUNK		(64UL << 10)

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

/* Runs one "<rw|pin> <pattern> <iova>:<len> ..." command to its end (state_mutex held). */
int vdma_dma_command(struct vdma_dev *vd, const char *cmd)
{
	struct vdma_job *job = kzalloc(sizeof(*job), GFP_KERNEL);
	int ret;

	if (!job)
		return -ENOMEM;
	ret = vdma_parse_job(job, cmd);
	if (ret)
		goto out;
	if (!vd->open) {
		ret = -ENODEV;		/* no container: nothing to DMA into */
		goto out;
	}
	if (!vdma_running(vd->mig_state)) {
		ret = -EBUSY;		/* a stopped device does no DMA */
		goto out;
	}
	job->vd = vd;
	INIT_WORK(&job->work, vdma_job_run);
	queue_work(system_unbound_wq, &job->work);
	flush_work(&job->work);
	ret = job->ret;
	vd->dma_commands++;
	vd->dma_bytes += job->bytes;
	vd->dma_pages_pinned += job->pinned;
out:
	kfree(job);
	return ret;
}

/* -- the background writer --------------------------------------------------------------- */

#define VDMA_RATE_TICK_MS	10
#define VDMA_RATE_MAX_PER_TICK	256

/*
 * One tick: catch up with "rate pages per second since the start", writing whole pages
 * through vfio_dma_rw() in turn over the range, lap k with the byte pattern + k. A stopped
 * device writes nothing and does not catch up later: its clock restarts when it runs.
 */
void vdma_rate_work(struct work_struct *work)
{
	struct vdma_dev *vd = container_of(to_delayed_work(work), struct vdma_dev, rate_work);
	u64 due, n;
	void *page;

	page = kmalloc(PAGE_SIZE, GFP_KERNEL);
	mutex_lock(&vd->state_mutex);
	if (!vd->rate)
		goto out;
	if (!page) {
		vd->rate_error = -ENOMEM;
		vd->rate = 0;
		goto out;
	}
	if (!vd->open || !vdma_running(vd->mig_state)) {
		vd->rate_start = jiffies;
		vd->rate_base = vd->rate_written;
		goto again;
	}
	due = vd->rate_base +
	      div_u64((u64)vd->rate * jiffies_to_msecs(jiffies - vd->rate_start), 1000);
	for (n = 0; vd->rate_written < due && n < VDMA_RATE_MAX_PER_TICK; n++) {
		u64 lap = div64_u64(vd->rate_written, vd->rate_pages);
		u64 iova = vd->rate_iova + (vd->rate_written - lap * vd->rate_pages) * PAGE_SIZE;
		int ret;

		/* each lap writes the next byte value, so a lost re-write shows */
		memset(page, (u8)(vd->rate_pattern + lap), PAGE_SIZE);
		ret = vfio_dma_rw(&vd->vdev, iova, page, PAGE_SIZE, true);

		if (ret) {
			vd->rate_error = ret;	/* e.g. the range was unmapped */
			vd->rate = 0;
			goto out;
		}
		vd->rate_written++;
		vd->dma_bytes += PAGE_SIZE;
	}
again:
	queue_delayed_work(system_unbound_wq, &vd->rate_work,
			   msecs_to_jiffies(VDMA_RATE_TICK_MS));
out:
	mutex_unlock(&vd->state_mutex);
	kfree(page);
}

/* Stops the writer and waits for a running tick (state_mutex not held). */
void vdma_rate_stop(struct vdma_dev *vd)
{
	mutex_lock(&vd->state_mutex);
	vd->rate = 0;
	mutex_unlock(&vd->state_mutex);
	cancel_delayed_work_sync(&vd->rate_work);
}

/* "<pages per second> <pattern> <iova>:<pages>" starts the writer; "0" stops it. */
int vdma_rate_command(struct vdma_dev *vd, const char *cmd)
{
	unsigned long long iova, pages;
	unsigned int rate, pattern;

	if (sysfs_streq(cmd, "0")) {
		vdma_rate_stop(vd);
		return 0;
	}
	if (sscanf(cmd, "%u %i %lli:%lli", &rate, &pattern, &iova, &pages) != 4 ||
	    !rate || pattern > 0xff || !pages || !PAGE_ALIGNED(iova) ||
	    pages > (U64_MAX - iova) / PAGE_SIZE)
		return -EINVAL;
	vdma_rate_stop(vd);
	mutex_lock(&vd->state_mutex);
	if (!vd->open) {
		mutex_unlock(&vd->state_mutex);
		return -ENODEV;
	}
	vd->rate = rate;
	vd->rate_pattern = pattern;
	vd->rate_iova = iova;
	vd->rate_pages = pages;
	vd->rate_written = 0;
	vd->rate_base = 0;
	vd->rate_start = jiffies;
	vd->rate_error = 0;
	queue_delayed_work(system_unbound_wq, &vd->rate_work, 0);
	mutex_unlock(&vd->state_mutex);
	return 0;
}
