/* The QEMU VM tier's guest workload, run as /init of a tiny initramfs
 * (native/qemu-guest/README.md). Written for vfiod.
 *
 * It pins WORK_PAGES pages and stamps each with a record the host can find in the guest's
 * RAM file (tests/support/qemu/pages.py reads it):
 *
 *   offset  0  16 bytes  magic "vfiod-workload!\0"
 *   offset 16  u64       page index, 0 .. pages-1
 *   offset 24  u64       the page's guest-physical address (from /proc/self/pagemap),
 *                        so the host can check that GPA == offset in the RAM file
 *   offset 32  u64       counter: the generation of the last sweep that wrote this page
 *
 * Then it sweeps forever: one sweep writes generation N into every page's counter in
 * index order, so after a sweep all pages hold N, and a page holding less than its
 * successor means a write was lost. About every 250 ms it prints
 * "workload: generation N" on the console. It never exits: init dying panics the guest,
 * which the host sees as QEMU exiting.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define PAGE_SIZE 4096UL
#define DEFAULT_WORK_PAGES 2048UL        /* 8 MiB */
#define REPORT_EVERY_NS 250000000LL
/* a pause between sweeps: keeps the vCPU (and so the host core TCG runs it on) mostly
 * idle while every page is still rewritten far faster than a migration pass */
#define SWEEP_PAUSE_NS 5000000L

struct page_record {
	char magic[16];
	uint64_t index;
	uint64_t gpa;
	uint64_t counter;
};

/* The magic is stored XORed and decoded at run time, so the binary itself (in the
 * initramfs, in the page cache) never holds the bytes the host scans for. */
static const unsigned char magic_xored[16] = {
	'v' ^ 0x5a, 'f' ^ 0x5a, 'i' ^ 0x5a, 'o' ^ 0x5a, 'd' ^ 0x5a, '-' ^ 0x5a, 'w' ^ 0x5a,
	'o' ^ 0x5a, 'r' ^ 0x5a, 'k' ^ 0x5a, 'l' ^ 0x5a, 'o' ^ 0x5a, 'a' ^ 0x5a, 'd' ^ 0x5a,
	'!' ^ 0x5a, 0 ^ 0x5a,
};
static volatile unsigned char magic_key = 0x5a;

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static void say(const char *fmt, ...)
{
	char line[256];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n >= sizeof(line))
		n = sizeof(line) - 1;
	/* the console is fd 1 (the kernel opened /dev/console for init) */
	if (write(1, line, (size_t)n) < 0)
		return;
}

static void fatal(const char *what)
{
	say("workload: FATAL %s: %s\n", what, strerror(errno));
	exit(1);
}

static int64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* The physical frame behind a locked virtual page (pagemap: bit 63 present, 0-54 PFN). */
static uint64_t gpa_of(int pagemap, const void *addr)
{
	uint64_t entry;
	off_t at = (off_t)((uintptr_t)addr / PAGE_SIZE * sizeof(entry));

	if (pread(pagemap, &entry, sizeof(entry), at) != (ssize_t)sizeof(entry))
		fatal("read /proc/self/pagemap");
	if (!(entry >> 63) || !(entry & ((1ULL << 55) - 1))) {
		errno = EFAULT;
		fatal("pagemap: page not present or PFN hidden");
	}
	return (entry & ((1ULL << 55) - 1)) * PAGE_SIZE;
}

/* /proc/iomem to the console, so the host sees the reserved device range. */
static void print_iomem(void)
{
	char buf[8192];
	ssize_t n;
	int fd = open("/proc/iomem", O_RDONLY);

	if (fd < 0)
		fatal("open /proc/iomem");
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n < 0)
		fatal("read /proc/iomem");
	buf[n] = '\0';
	for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n"))
		say("workload: iomem %s\n", line);
}

static unsigned long work_pages_from_env(void)
{
	/* the kernel hands unknown name=value boot options to init as environment */
	const char *raw = getenv("workload_pages");
	char *end;
	unsigned long n;

	if (!raw)
		return DEFAULT_WORK_PAGES;
	errno = 0;
	n = strtoul(raw, &end, 10);
	if (errno || *end || n == 0 || n > (1UL << 20)) {
		errno = EINVAL;
		fatal("workload_pages= must be 1..1048576");
	}
	return n;
}

int main(void)
{
	unsigned long pages = work_pages_from_env();
	unsigned char *area;
	int pagemap;
	uint64_t generation = 0;
	int64_t next_report;
	const struct timespec pause = { .tv_sec = 0, .tv_nsec = SWEEP_PAUSE_NS };

	mkdir("/proc", 0555);
	mkdir("/dev", 0755);
	if (mount("proc", "/proc", "proc", 0, NULL) && errno != EBUSY)
		fatal("mount /proc");
	if (mount("devtmpfs", "/dev", "devtmpfs", 0, NULL) && errno != EBUSY)
		fatal("mount /dev");
	area = mmap(NULL, pages * PAGE_SIZE, PROT_READ | PROT_WRITE,
		    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (area == MAP_FAILED)
		fatal("mmap the work area");
	/* no huge pages, locked: khugepaged or reclaim would move a page to another
	 * guest-physical address and make its recorded GPA stale */
	if (madvise(area, pages * PAGE_SIZE, MADV_NOHUGEPAGE))
		fatal("madvise MADV_NOHUGEPAGE");
	if (mlock(area, pages * PAGE_SIZE))
		fatal("mlock the work area");
	pagemap = open("/proc/self/pagemap", O_RDONLY);
	if (pagemap < 0)
		fatal("open /proc/self/pagemap");
	for (unsigned long i = 0; i < pages; i++) {
		struct page_record *rec = (struct page_record *)(area + i * PAGE_SIZE);

		/* decoded straight into the record: a decoded copy in a local could sit at
		 * the start of a stack page and pass for a record in a scan of guest RAM */
		for (int b = 0; b < 16; b++)
			rec->magic[b] = (char)(magic_xored[b] ^ magic_key);
		rec->index = i;
		rec->gpa = gpa_of(pagemap, rec);
		rec->counter = 0;
	}
	close(pagemap);
	print_iomem();
	say("workload: ready pages=%lu first_gpa=0x%llx\n", pages,
	    (unsigned long long)((struct page_record *)area)->gpa);

	next_report = now_ns();
	for (;;) {
		generation++;
		for (unsigned long i = 0; i < pages; i++) {
			volatile struct page_record *rec =
				(volatile struct page_record *)(area + i * PAGE_SIZE);
			rec->counter = generation;
		}
		if (now_ns() >= next_report) {
			say("workload: generation %llu\n", (unsigned long long)generation);
			next_report = now_ns() + REPORT_EVERY_NS;
		}
		nanosleep(&pause, NULL);
	}
}
