/*
 * abi_probe.c - print what C sees of the VFIO / iommufd uAPI as one JSON object, so
 * tests/abi can compare vfiod's ctypes mirrors (vfiod/abi/) with real kernel headers
 * (docs/kernel-contract.md sections 0-7; docs/testing.md "Checking ctypes layouts ...").
 *
 * Keys (all values are unsigned integers unless noted):
 *   struct.<name>.sizeof             sizeof(struct <name>)
 *   struct.<name>.offsetof.<field>   offsetof(struct <name>, <field>)
 *   struct.<name>.sizeof.<field>     sizeof of that member
 *   struct.<name>.elemsize.<field>   element size of a flexible array member
 *   const.<NAME>                     value of a macro or enumerator
 *   macro.<MACRO>(<arg>)             result of a function-like macro for that argument
 *   meta.has_iommufd                 1 if <linux/iommufd.h> was found
 *
 * One source serves every header set: things only newer headers have are guarded by
 * #ifdef on a macro introduced in the same release, or by __has_include. A guard that
 * is wrong for some header set breaks the compile loudly instead of hiding a field.
 *
 * Build:  gcc -std=gnu11 [-I dir-with-linux/vfio.h] [-D__user=] abi_probe.c
 */
#include <stddef.h>
#include <stdio.h>
#include <linux/vfio.h>
#if __has_include(<linux/iommufd.h>)
#include <linux/iommufd.h>
#define HAVE_IOMMUFD 1
#else
#define HAVE_IOMMUFD 0
#endif

static int first = 1;

static void emit(const char *key, unsigned long long value)
{
	printf("%s\n  \"%s\": %llu", first ? "{" : ",", key, value);
	first = 0;
}

static void emit_str(const char *key, const char *value)
{
	/* Only plain identifiers like "vfio-pci" are emitted: no escaping needed. */
	printf("%s\n  \"%s\": \"%s\"", first ? "{" : ",", key, value);
	first = 0;
}

#define SIZE(s) emit("struct." #s ".sizeof", sizeof(struct s))
#define FIELD(s, f) do { \
	emit("struct." #s ".offsetof." #f, offsetof(struct s, f)); \
	emit("struct." #s ".sizeof." #f, sizeof(((struct s *)0)->f)); \
} while (0)
#define FLEX(s, f) do { \
	emit("struct." #s ".offsetof." #f, offsetof(struct s, f)); \
	emit("struct." #s ".elemsize." #f, sizeof(((struct s *)0)->f[0])); \
} while (0)
#define CONST(c) emit("const." #c, (unsigned long long)(c))
/* For a constant written as a signed int but only ever stored in a __u32 field. */
#define CONST_U32(c) emit("const." #c, (unsigned long long)(__u32)(c))
#define MACRO(m, arg) emit("macro." #m "(" #arg ")", (unsigned long long)(m(arg)))

static void container_group_device(void)
{
	CONST(VFIO_API_VERSION); CONST(VFIO_TYPE); CONST(VFIO_BASE);
	CONST(VFIO_TYPE1_IOMMU); CONST(VFIO_SPAPR_TCE_IOMMU); CONST(VFIO_TYPE1v2_IOMMU);
	CONST(VFIO_DMA_CC_IOMMU); CONST(VFIO_EEH);
#ifdef VFIO_TYPE1_NESTING_IOMMU
	CONST(VFIO_TYPE1_NESTING_IOMMU);
#endif
	CONST(VFIO_SPAPR_TCE_v2_IOMMU); CONST(VFIO_NOIOMMU_IOMMU);
	CONST(VFIO_UNMAP_ALL); CONST(VFIO_UPDATE_VADDR);

	CONST(VFIO_GET_API_VERSION); CONST(VFIO_CHECK_EXTENSION); CONST(VFIO_SET_IOMMU);
	CONST(VFIO_GROUP_GET_STATUS); CONST(VFIO_GROUP_SET_CONTAINER);
	CONST(VFIO_GROUP_UNSET_CONTAINER); CONST(VFIO_GROUP_GET_DEVICE_FD);
	CONST(VFIO_DEVICE_GET_INFO); CONST(VFIO_DEVICE_GET_REGION_INFO);
	CONST(VFIO_DEVICE_GET_IRQ_INFO); CONST(VFIO_DEVICE_SET_IRQS); CONST(VFIO_DEVICE_RESET);
	CONST(VFIO_DEVICE_GET_PCI_HOT_RESET_INFO); CONST(VFIO_DEVICE_PCI_HOT_RESET);
	CONST(VFIO_DEVICE_IOEVENTFD); CONST(VFIO_DEVICE_FEATURE);
	CONST(VFIO_IOMMU_GET_INFO); CONST(VFIO_IOMMU_MAP_DMA); CONST(VFIO_IOMMU_UNMAP_DMA);
	CONST(VFIO_IOMMU_ENABLE); CONST(VFIO_IOMMU_DISABLE); CONST(VFIO_IOMMU_DIRTY_PAGES);

	SIZE(vfio_info_cap_header);
	FIELD(vfio_info_cap_header, id); FIELD(vfio_info_cap_header, version);
	FIELD(vfio_info_cap_header, next);

	SIZE(vfio_group_status);
	FIELD(vfio_group_status, argsz); FIELD(vfio_group_status, flags);
	CONST(VFIO_GROUP_FLAGS_VIABLE); CONST(VFIO_GROUP_FLAGS_CONTAINER_SET);

	SIZE(vfio_device_info);
	FIELD(vfio_device_info, argsz); FIELD(vfio_device_info, flags);
	FIELD(vfio_device_info, num_regions); FIELD(vfio_device_info, num_irqs);
	FIELD(vfio_device_info, cap_offset);
#ifdef VFIO_DEVICE_BIND_IOMMUFD	/* the explicit pad arrived with the cdev uAPI (6.6) */
	FIELD(vfio_device_info, pad);
#endif
	CONST(VFIO_DEVICE_FLAGS_RESET); CONST(VFIO_DEVICE_FLAGS_PCI);
	CONST(VFIO_DEVICE_FLAGS_PLATFORM); CONST(VFIO_DEVICE_FLAGS_AMBA);
	CONST(VFIO_DEVICE_FLAGS_CCW); CONST(VFIO_DEVICE_FLAGS_AP);
	CONST(VFIO_DEVICE_FLAGS_FSL_MC); CONST(VFIO_DEVICE_FLAGS_CAPS);
#ifdef VFIO_DEVICE_FLAGS_CDX
	CONST(VFIO_DEVICE_FLAGS_CDX);
#endif
	emit_str("const.VFIO_DEVICE_API_PCI_STRING", VFIO_DEVICE_API_PCI_STRING);
}

static void regions_irqs(void)
{
	SIZE(vfio_region_info);
	FIELD(vfio_region_info, argsz); FIELD(vfio_region_info, flags);
	FIELD(vfio_region_info, index); FIELD(vfio_region_info, cap_offset);
	FIELD(vfio_region_info, size); FIELD(vfio_region_info, offset);
	CONST(VFIO_REGION_INFO_FLAG_READ); CONST(VFIO_REGION_INFO_FLAG_WRITE);
	CONST(VFIO_REGION_INFO_FLAG_MMAP); CONST(VFIO_REGION_INFO_FLAG_CAPS);
	CONST(VFIO_REGION_INFO_CAP_SPARSE_MMAP); CONST(VFIO_REGION_INFO_CAP_TYPE);
	CONST(VFIO_REGION_INFO_CAP_MSIX_MAPPABLE); CONST(VFIO_REGION_INFO_CAP_NVLINK2_SSATGT);
	CONST(VFIO_REGION_INFO_CAP_NVLINK2_LNKSPD);

	SIZE(vfio_region_sparse_mmap_area);
	FIELD(vfio_region_sparse_mmap_area, offset); FIELD(vfio_region_sparse_mmap_area, size);
	SIZE(vfio_region_info_cap_sparse_mmap);
	FIELD(vfio_region_info_cap_sparse_mmap, header);
	FIELD(vfio_region_info_cap_sparse_mmap, nr_areas);
	FIELD(vfio_region_info_cap_sparse_mmap, reserved);
	FLEX(vfio_region_info_cap_sparse_mmap, areas);
	SIZE(vfio_region_info_cap_type);
	FIELD(vfio_region_info_cap_type, header); FIELD(vfio_region_info_cap_type, type);
	FIELD(vfio_region_info_cap_type, subtype);
	/* (1 << 31) is a negative int in C; it is OR-ed into the __u32 cap "type". */
	CONST_U32(VFIO_REGION_TYPE_PCI_VENDOR_TYPE); CONST(VFIO_REGION_TYPE_PCI_VENDOR_MASK);
	CONST(VFIO_REGION_TYPE_GFX); CONST(VFIO_REGION_TYPE_CCW);

	CONST(VFIO_PCI_BAR0_REGION_INDEX); CONST(VFIO_PCI_BAR1_REGION_INDEX);
	CONST(VFIO_PCI_BAR2_REGION_INDEX); CONST(VFIO_PCI_BAR3_REGION_INDEX);
	CONST(VFIO_PCI_BAR4_REGION_INDEX); CONST(VFIO_PCI_BAR5_REGION_INDEX);
	CONST(VFIO_PCI_ROM_REGION_INDEX); CONST(VFIO_PCI_CONFIG_REGION_INDEX);
	CONST(VFIO_PCI_VGA_REGION_INDEX); CONST(VFIO_PCI_NUM_REGIONS);

	SIZE(vfio_irq_info);
	FIELD(vfio_irq_info, argsz); FIELD(vfio_irq_info, flags);
	FIELD(vfio_irq_info, index); FIELD(vfio_irq_info, count);
	CONST(VFIO_IRQ_INFO_EVENTFD); CONST(VFIO_IRQ_INFO_MASKABLE);
	CONST(VFIO_IRQ_INFO_AUTOMASKED); CONST(VFIO_IRQ_INFO_NORESIZE);
	SIZE(vfio_irq_set);
	FIELD(vfio_irq_set, argsz); FIELD(vfio_irq_set, flags); FIELD(vfio_irq_set, index);
	FIELD(vfio_irq_set, start); FIELD(vfio_irq_set, count); FLEX(vfio_irq_set, data);
	CONST(VFIO_IRQ_SET_DATA_NONE); CONST(VFIO_IRQ_SET_DATA_BOOL);
	CONST(VFIO_IRQ_SET_DATA_EVENTFD); CONST(VFIO_IRQ_SET_ACTION_MASK);
	CONST(VFIO_IRQ_SET_ACTION_UNMASK); CONST(VFIO_IRQ_SET_ACTION_TRIGGER);
	CONST(VFIO_IRQ_SET_DATA_TYPE_MASK); CONST(VFIO_IRQ_SET_ACTION_TYPE_MASK);
	CONST(VFIO_PCI_INTX_IRQ_INDEX); CONST(VFIO_PCI_MSI_IRQ_INDEX);
	CONST(VFIO_PCI_MSIX_IRQ_INDEX); CONST(VFIO_PCI_ERR_IRQ_INDEX);
	CONST(VFIO_PCI_REQ_IRQ_INDEX); CONST(VFIO_PCI_NUM_IRQS);
}

static void type1(void)
{
	SIZE(vfio_iommu_type1_info);
	FIELD(vfio_iommu_type1_info, argsz); FIELD(vfio_iommu_type1_info, flags);
	FIELD(vfio_iommu_type1_info, iova_pgsizes); FIELD(vfio_iommu_type1_info, cap_offset);
#ifdef VFIO_DEVICE_BIND_IOMMUFD	/* named pad: same 6.6 change as vfio_device_info */
	FIELD(vfio_iommu_type1_info, pad);
#endif
	CONST(VFIO_IOMMU_INFO_PGSIZES); CONST(VFIO_IOMMU_INFO_CAPS);
	CONST(VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE); CONST(VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION);
	CONST(VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL);

	SIZE(vfio_iova_range);
	FIELD(vfio_iova_range, start); FIELD(vfio_iova_range, end);
	SIZE(vfio_iommu_type1_info_cap_iova_range);
	FIELD(vfio_iommu_type1_info_cap_iova_range, header);
	FIELD(vfio_iommu_type1_info_cap_iova_range, nr_iovas);
	FIELD(vfio_iommu_type1_info_cap_iova_range, reserved);
	FLEX(vfio_iommu_type1_info_cap_iova_range, iova_ranges);
	SIZE(vfio_iommu_type1_info_cap_migration);
	FIELD(vfio_iommu_type1_info_cap_migration, header);
	FIELD(vfio_iommu_type1_info_cap_migration, flags);
	FIELD(vfio_iommu_type1_info_cap_migration, pgsize_bitmap);
	FIELD(vfio_iommu_type1_info_cap_migration, max_dirty_bitmap_size);
	SIZE(vfio_iommu_type1_info_dma_avail);
	FIELD(vfio_iommu_type1_info_dma_avail, header);
	FIELD(vfio_iommu_type1_info_dma_avail, avail);

	SIZE(vfio_iommu_type1_dma_map);
	FIELD(vfio_iommu_type1_dma_map, argsz); FIELD(vfio_iommu_type1_dma_map, flags);
	FIELD(vfio_iommu_type1_dma_map, vaddr); FIELD(vfio_iommu_type1_dma_map, iova);
	FIELD(vfio_iommu_type1_dma_map, size);
	CONST(VFIO_DMA_MAP_FLAG_READ); CONST(VFIO_DMA_MAP_FLAG_WRITE);
	CONST(VFIO_DMA_MAP_FLAG_VADDR);

	SIZE(vfio_bitmap);
	FIELD(vfio_bitmap, pgsize); FIELD(vfio_bitmap, size); FIELD(vfio_bitmap, data);
	SIZE(vfio_iommu_type1_dma_unmap);
	FIELD(vfio_iommu_type1_dma_unmap, argsz); FIELD(vfio_iommu_type1_dma_unmap, flags);
	FIELD(vfio_iommu_type1_dma_unmap, iova); FIELD(vfio_iommu_type1_dma_unmap, size);
	FLEX(vfio_iommu_type1_dma_unmap, data);
	CONST(VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP); CONST(VFIO_DMA_UNMAP_FLAG_ALL);
	CONST(VFIO_DMA_UNMAP_FLAG_VADDR);

	SIZE(vfio_iommu_type1_dirty_bitmap);
	FIELD(vfio_iommu_type1_dirty_bitmap, argsz); FIELD(vfio_iommu_type1_dirty_bitmap, flags);
	FLEX(vfio_iommu_type1_dirty_bitmap, data);
	SIZE(vfio_iommu_type1_dirty_bitmap_get);
	FIELD(vfio_iommu_type1_dirty_bitmap_get, iova);
	FIELD(vfio_iommu_type1_dirty_bitmap_get, size);
	FIELD(vfio_iommu_type1_dirty_bitmap_get, bitmap);
	CONST(VFIO_IOMMU_DIRTY_PAGES_FLAG_START); CONST(VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP);
	CONST(VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP);
}

static void features_migration(void)
{
	SIZE(vfio_device_feature);
	FIELD(vfio_device_feature, argsz); FIELD(vfio_device_feature, flags);
	FLEX(vfio_device_feature, data);
	CONST(VFIO_DEVICE_FEATURE_MASK); CONST(VFIO_DEVICE_FEATURE_GET);
	CONST(VFIO_DEVICE_FEATURE_SET); CONST(VFIO_DEVICE_FEATURE_PROBE);
	CONST(VFIO_DEVICE_FEATURE_PCI_VF_TOKEN); CONST(VFIO_DEVICE_FEATURE_MIGRATION);
	CONST(VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE); CONST(VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY);
	CONST(VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP);
	CONST(VFIO_DEVICE_FEATURE_LOW_POWER_EXIT);
	CONST(VFIO_DEVICE_FEATURE_DMA_LOGGING_START); CONST(VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP);
	CONST(VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT);
#ifdef VFIO_DEVICE_FEATURE_MIG_DATA_SIZE
	CONST(VFIO_DEVICE_FEATURE_MIG_DATA_SIZE);
	SIZE(vfio_device_feature_mig_data_size);
	FIELD(vfio_device_feature_mig_data_size, stop_copy_length);
#endif
#ifdef VFIO_DEVICE_FEATURE_BUS_MASTER
	CONST(VFIO_DEVICE_FEATURE_BUS_MASTER);
#endif

	SIZE(vfio_device_feature_migration);
	FIELD(vfio_device_feature_migration, flags);
	CONST(VFIO_MIGRATION_STOP_COPY); CONST(VFIO_MIGRATION_P2P);
	SIZE(vfio_device_feature_mig_state);
	FIELD(vfio_device_feature_mig_state, device_state);
	FIELD(vfio_device_feature_mig_state, data_fd);
	CONST(VFIO_DEVICE_STATE_ERROR); CONST(VFIO_DEVICE_STATE_STOP);
	CONST(VFIO_DEVICE_STATE_RUNNING); CONST(VFIO_DEVICE_STATE_STOP_COPY);
	CONST(VFIO_DEVICE_STATE_RESUMING); CONST(VFIO_DEVICE_STATE_RUNNING_P2P);
#ifdef VFIO_MIGRATION_PRE_COPY	/* the PRE_COPY states and the NR sentinel came with it */
	CONST(VFIO_MIGRATION_PRE_COPY);
	CONST(VFIO_DEVICE_STATE_PRE_COPY); CONST(VFIO_DEVICE_STATE_PRE_COPY_P2P);
	CONST(VFIO_DEVICE_STATE_NR);
#endif
#ifdef VFIO_MIG_GET_PRECOPY_INFO
	CONST(VFIO_MIG_GET_PRECOPY_INFO);
	SIZE(vfio_precopy_info);
	FIELD(vfio_precopy_info, argsz); FIELD(vfio_precopy_info, flags);
	FIELD(vfio_precopy_info, initial_bytes); FIELD(vfio_precopy_info, dirty_bytes);
#endif
	SIZE(vfio_device_low_power_entry_with_wakeup);
	FIELD(vfio_device_low_power_entry_with_wakeup, wakeup_eventfd);
	FIELD(vfio_device_low_power_entry_with_wakeup, reserved);

	SIZE(vfio_device_feature_dma_logging_control);
	FIELD(vfio_device_feature_dma_logging_control, page_size);
	FIELD(vfio_device_feature_dma_logging_control, num_ranges);
	FIELD(vfio_device_feature_dma_logging_control, __reserved);
	FIELD(vfio_device_feature_dma_logging_control, ranges);
	SIZE(vfio_device_feature_dma_logging_range);
	FIELD(vfio_device_feature_dma_logging_range, iova);
	FIELD(vfio_device_feature_dma_logging_range, length);
	SIZE(vfio_device_feature_dma_logging_report);
	FIELD(vfio_device_feature_dma_logging_report, iova);
	FIELD(vfio_device_feature_dma_logging_report, length);
	FIELD(vfio_device_feature_dma_logging_report, page_size);
	FIELD(vfio_device_feature_dma_logging_report, bitmap);
}

static void cdev(void)
{
#ifdef VFIO_DEVICE_BIND_IOMMUFD
	CONST(VFIO_DEVICE_BIND_IOMMUFD); CONST(VFIO_DEVICE_ATTACH_IOMMUFD_PT);
	CONST(VFIO_DEVICE_DETACH_IOMMUFD_PT);
	SIZE(vfio_device_bind_iommufd);
	FIELD(vfio_device_bind_iommufd, argsz); FIELD(vfio_device_bind_iommufd, flags);
	FIELD(vfio_device_bind_iommufd, iommufd); FIELD(vfio_device_bind_iommufd, out_devid);
	SIZE(vfio_device_attach_iommufd_pt);
	FIELD(vfio_device_attach_iommufd_pt, argsz); FIELD(vfio_device_attach_iommufd_pt, flags);
	FIELD(vfio_device_attach_iommufd_pt, pt_id);
	SIZE(vfio_device_detach_iommufd_pt);
	FIELD(vfio_device_detach_iommufd_pt, argsz); FIELD(vfio_device_detach_iommufd_pt, flags);
#endif
}

static void migration_v1(void)
{
	/* The deprecated v1 region: a stub kept in 5.18+ headers. */
	CONST(VFIO_REGION_TYPE_MIGRATION_DEPRECATED);
	CONST(VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED);
	SIZE(vfio_device_migration_info);
	FIELD(vfio_device_migration_info, device_state);
	FIELD(vfio_device_migration_info, reserved);
	FIELD(vfio_device_migration_info, pending_bytes);
	FIELD(vfio_device_migration_info, data_offset);
	FIELD(vfio_device_migration_info, data_size);
	CONST(VFIO_DEVICE_STATE_V1_STOP); CONST(VFIO_DEVICE_STATE_V1_RUNNING);
	CONST(VFIO_DEVICE_STATE_V1_SAVING); CONST(VFIO_DEVICE_STATE_V1_RESUMING);
	CONST(VFIO_DEVICE_STATE_MASK);
	MACRO(VFIO_DEVICE_STATE_SET_ERROR, 0);
	/* The header's rule macros for every 3-bit state, and with a reserved bit set. */
	MACRO(VFIO_DEVICE_STATE_VALID, 0); MACRO(VFIO_DEVICE_STATE_VALID, 1);
	MACRO(VFIO_DEVICE_STATE_VALID, 2); MACRO(VFIO_DEVICE_STATE_VALID, 3);
	MACRO(VFIO_DEVICE_STATE_VALID, 4); MACRO(VFIO_DEVICE_STATE_VALID, 5);
	MACRO(VFIO_DEVICE_STATE_VALID, 6); MACRO(VFIO_DEVICE_STATE_VALID, 7);
	MACRO(VFIO_DEVICE_STATE_VALID, 12); MACRO(VFIO_DEVICE_STATE_VALID, 9);
	MACRO(VFIO_DEVICE_STATE_IS_ERROR, 0); MACRO(VFIO_DEVICE_STATE_IS_ERROR, 1);
	MACRO(VFIO_DEVICE_STATE_IS_ERROR, 2); MACRO(VFIO_DEVICE_STATE_IS_ERROR, 3);
	MACRO(VFIO_DEVICE_STATE_IS_ERROR, 4); MACRO(VFIO_DEVICE_STATE_IS_ERROR, 5);
	MACRO(VFIO_DEVICE_STATE_IS_ERROR, 6); MACRO(VFIO_DEVICE_STATE_IS_ERROR, 7);
	MACRO(VFIO_DEVICE_STATE_IS_ERROR, 14);
}

#if HAVE_IOMMUFD
static void iommufd(void)
{
	CONST(IOMMUFD_TYPE); CONST(IOMMUFD_CMD_BASE);
	CONST(IOMMUFD_CMD_DESTROY); CONST(IOMMUFD_CMD_IOAS_ALLOC);
	CONST(IOMMUFD_CMD_IOAS_ALLOW_IOVAS); CONST(IOMMUFD_CMD_IOAS_COPY);
	CONST(IOMMUFD_CMD_IOAS_IOVA_RANGES); CONST(IOMMUFD_CMD_IOAS_MAP);
	CONST(IOMMUFD_CMD_IOAS_UNMAP); CONST(IOMMUFD_CMD_OPTION); CONST(IOMMUFD_CMD_VFIO_IOAS);
	CONST(IOMMUFD_CMD_HWPT_ALLOC); CONST(IOMMUFD_CMD_GET_HW_INFO);
	CONST(IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING); CONST(IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP);
	CONST(IOMMU_DESTROY); CONST(IOMMU_IOAS_ALLOC); CONST(IOMMU_IOAS_ALLOW_IOVAS);
	CONST(IOMMU_IOAS_COPY); CONST(IOMMU_IOAS_IOVA_RANGES); CONST(IOMMU_IOAS_MAP);
	CONST(IOMMU_IOAS_UNMAP); CONST(IOMMU_OPTION); CONST(IOMMU_VFIO_IOAS);
	CONST(IOMMU_HWPT_ALLOC); CONST(IOMMU_GET_HW_INFO);
	CONST(IOMMU_HWPT_SET_DIRTY_TRACKING); CONST(IOMMU_HWPT_GET_DIRTY_BITMAP);

	SIZE(iommu_destroy); FIELD(iommu_destroy, size); FIELD(iommu_destroy, id);
	SIZE(iommu_ioas_alloc);
	FIELD(iommu_ioas_alloc, size); FIELD(iommu_ioas_alloc, flags);
	FIELD(iommu_ioas_alloc, out_ioas_id);
	SIZE(iommu_iova_range); FIELD(iommu_iova_range, start); FIELD(iommu_iova_range, last);
	SIZE(iommu_ioas_iova_ranges);
	FIELD(iommu_ioas_iova_ranges, size); FIELD(iommu_ioas_iova_ranges, ioas_id);
	FIELD(iommu_ioas_iova_ranges, num_iovas); FIELD(iommu_ioas_iova_ranges, __reserved);
	FIELD(iommu_ioas_iova_ranges, allowed_iovas);
	FIELD(iommu_ioas_iova_ranges, out_iova_alignment);
	SIZE(iommu_ioas_allow_iovas);
	FIELD(iommu_ioas_allow_iovas, size); FIELD(iommu_ioas_allow_iovas, ioas_id);
	FIELD(iommu_ioas_allow_iovas, num_iovas); FIELD(iommu_ioas_allow_iovas, __reserved);
	FIELD(iommu_ioas_allow_iovas, allowed_iovas);
	SIZE(iommu_ioas_map);
	FIELD(iommu_ioas_map, size); FIELD(iommu_ioas_map, flags); FIELD(iommu_ioas_map, ioas_id);
	FIELD(iommu_ioas_map, __reserved); FIELD(iommu_ioas_map, user_va);
	FIELD(iommu_ioas_map, length); FIELD(iommu_ioas_map, iova);
	CONST(IOMMU_IOAS_MAP_FIXED_IOVA); CONST(IOMMU_IOAS_MAP_WRITEABLE);
	CONST(IOMMU_IOAS_MAP_READABLE);
	SIZE(iommu_ioas_copy);
	FIELD(iommu_ioas_copy, size); FIELD(iommu_ioas_copy, flags);
	FIELD(iommu_ioas_copy, dst_ioas_id); FIELD(iommu_ioas_copy, src_ioas_id);
	FIELD(iommu_ioas_copy, length); FIELD(iommu_ioas_copy, dst_iova);
	FIELD(iommu_ioas_copy, src_iova);
	SIZE(iommu_ioas_unmap);
	FIELD(iommu_ioas_unmap, size); FIELD(iommu_ioas_unmap, ioas_id);
	FIELD(iommu_ioas_unmap, iova); FIELD(iommu_ioas_unmap, length);
	SIZE(iommu_option);
	FIELD(iommu_option, size); FIELD(iommu_option, option_id); FIELD(iommu_option, op);
	FIELD(iommu_option, __reserved); FIELD(iommu_option, object_id);
	FIELD(iommu_option, val64);
	CONST(IOMMU_OPTION_RLIMIT_MODE); CONST(IOMMU_OPTION_HUGE_PAGES);
	CONST(IOMMU_OPTION_OP_SET); CONST(IOMMU_OPTION_OP_GET);
	SIZE(iommu_vfio_ioas);
	FIELD(iommu_vfio_ioas, size); FIELD(iommu_vfio_ioas, ioas_id);
	FIELD(iommu_vfio_ioas, op); FIELD(iommu_vfio_ioas, __reserved);
	CONST(IOMMU_VFIO_IOAS_GET); CONST(IOMMU_VFIO_IOAS_SET); CONST(IOMMU_VFIO_IOAS_CLEAR);

	SIZE(iommu_hwpt_alloc);
	FIELD(iommu_hwpt_alloc, size); FIELD(iommu_hwpt_alloc, flags);
	FIELD(iommu_hwpt_alloc, dev_id); FIELD(iommu_hwpt_alloc, pt_id);
	FIELD(iommu_hwpt_alloc, out_hwpt_id); FIELD(iommu_hwpt_alloc, __reserved);
	FIELD(iommu_hwpt_alloc, data_type); FIELD(iommu_hwpt_alloc, data_len);
	FIELD(iommu_hwpt_alloc, data_uptr);
#ifdef IOMMU_FAULT_QUEUE_ALLOC	/* fault_id arrived with the fault queue (6.11) */
	FIELD(iommu_hwpt_alloc, fault_id); FIELD(iommu_hwpt_alloc, __reserved2);
	CONST(IOMMU_HWPT_FAULT_ID_VALID);
#endif
	CONST(IOMMU_HWPT_ALLOC_NEST_PARENT); CONST(IOMMU_HWPT_ALLOC_DIRTY_TRACKING);
	CONST(IOMMU_HWPT_DATA_NONE);
	SIZE(iommu_hw_info);
	FIELD(iommu_hw_info, size); FIELD(iommu_hw_info, flags); FIELD(iommu_hw_info, dev_id);
	FIELD(iommu_hw_info, data_len); FIELD(iommu_hw_info, data_uptr);
	FIELD(iommu_hw_info, out_data_type);
#ifdef IOMMU_FAULT_QUEUE_ALLOC	/* out_max_pasid_log2: in 6.12 (whose header also has the fault queue) */
	FIELD(iommu_hw_info, out_max_pasid_log2);
#endif
	FIELD(iommu_hw_info, __reserved); FIELD(iommu_hw_info, out_capabilities);
	CONST(IOMMU_HW_INFO_TYPE_NONE); CONST(IOMMU_HW_INFO_TYPE_INTEL_VTD);
	CONST(IOMMU_HW_CAP_DIRTY_TRACKING);
	SIZE(iommu_hwpt_set_dirty_tracking);
	FIELD(iommu_hwpt_set_dirty_tracking, size); FIELD(iommu_hwpt_set_dirty_tracking, flags);
	FIELD(iommu_hwpt_set_dirty_tracking, hwpt_id);
	FIELD(iommu_hwpt_set_dirty_tracking, __reserved);
	CONST(IOMMU_HWPT_DIRTY_TRACKING_ENABLE);
	SIZE(iommu_hwpt_get_dirty_bitmap);
	FIELD(iommu_hwpt_get_dirty_bitmap, size); FIELD(iommu_hwpt_get_dirty_bitmap, hwpt_id);
	FIELD(iommu_hwpt_get_dirty_bitmap, flags); FIELD(iommu_hwpt_get_dirty_bitmap, __reserved);
	FIELD(iommu_hwpt_get_dirty_bitmap, iova); FIELD(iommu_hwpt_get_dirty_bitmap, length);
	FIELD(iommu_hwpt_get_dirty_bitmap, page_size); FIELD(iommu_hwpt_get_dirty_bitmap, data);
	CONST(IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR);
}
#endif

int main(void)
{
	emit("meta.has_iommufd", HAVE_IOMMUFD);
	container_group_device();
	regions_irqs();
	type1();
	features_migration();
	cdev();
	migration_v1();
#if HAVE_IOMMUFD
	iommufd();
#endif
	printf("\n}\n");
	return 0;
}
