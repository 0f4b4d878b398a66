/* SPDX-License-Identifier: GPL-2.0 */
/*
 * hvtpasid ioctl interface, shared by the kernel module (kmod/hvtpasid) and the guest helper
 * hvtdma. One misc device, /dev/hvtpasid, for the one hvt-pci device the module binds.
 */
#ifndef HVTPASID_H
#define HVTPASID_H

#include <linux/ioctl.h>
#include <linux/types.h>

/* hvtp_info.flags */
#define HVTP_F_PASID      (1u << 0) /* the domain is attached to PASID hvtp_info.pasid */
#define HVTP_F_PASID_PCI  (1u << 1) /* PASID Enable set by pci_enable_pasid() */
#define HVTP_F_PASID_RAW  (1u << 2) /* PASID Enable written by the module (pci_enable_pasid
                                       refused: no End-End TLP Prefix path) */
#define HVTP_F_NO_TLP     (1u << 3) /* the module declared pasid_no_tlp (an RCiEP) */

struct hvtp_info {
	__u32 pasid;       /* the PASID the domain is attached to (0: none, RID mode) */
	__u32 flags;       /* HVTP_F_* */
	__u32 pasid_ctrl;  /* the PASID Control register as read back after enabling */
	__u32 max_pasids;  /* dev->iommu->max_pasids as the IOMMU core computed it */
	char bdf[32];      /* pci_name() of the bound device */
};

/* prot bits of hvtp_map */
#define HVTP_READ  1u /* the device may read (IOMMU_READ) */
#define HVTP_WRITE 2u /* the device may write (IOMMU_WRITE) */

struct hvtp_map {
	__u64 uaddr; /* page-aligned user address */
	__u64 iova;  /* page-aligned bus address in the PASID's domain */
	__u64 size;  /* bytes, a multiple of 4 KiB */
	__u32 prot;  /* HVTP_READ | HVTP_WRITE */
	__u32 pad;
};

struct hvtp_unmap {
	__u64 iova; /* exactly an iova given to HVTP_MAP */
};

#define HVTP_IOC_MAGIC 'H'
#define HVTP_GET_INFO _IOR(HVTP_IOC_MAGIC, 0x40, struct hvtp_info)
#define HVTP_MAP      _IOW(HVTP_IOC_MAGIC, 0x41, struct hvtp_map)
#define HVTP_UNMAP    _IOW(HVTP_IOC_MAGIC, 0x42, struct hvtp_unmap)

#endif
