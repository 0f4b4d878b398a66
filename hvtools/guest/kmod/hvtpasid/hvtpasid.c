// SPDX-License-Identifier: GPL-2.0
/*
 * hvtpasid: gives the hvt-pci DMA engine (PCI 1234:11f0, hvtools qemu-patches/README.md) a
 * PASID-tagged address space in the guest kernel's own IOMMU, for the guest helper hvtdma.
 *
 * Linux 6.12 offers no user interface for PASID attach without IOMMUFD (Debian's cloud kernel
 * builds none), and SVA needs PRI. So this module, bound to the device:
 *   1. enables the device's PASID capability (PCIe 6.0 s7.8.8): pci_enable_pasid(); an RCiEP
 *      without the End-End TLP Prefix Supported bit is refused that ("no TLP prefix path"),
 *      so the module declares pasid_no_tlp (an RCiEP's requests never cross a link) and tries
 *      again, and writes PASID Enable itself as the last resort;
 *   2. allocates a PASID (iommu_alloc_global_pasid) and an unmanaged paging domain
 *      (iommu_paging_domain_alloc) and attaches the domain to that PASID only
 *      (iommu_attach_device_pasid): requests without PASID keep the device's DMA-API domain.
 *      Intel VT-d scalable mode then writes a PASID-table entry for it (VT-d s9.6), first- or
 *      second-stage as the IOMMU offers;
 *   3. offers /dev/hvtpasid: HVTP_MAP pins a user buffer and iommu_map()s it at a chosen IOVA
 *      in that domain, HVTP_UNMAP undoes it, HVTP_GET_INFO reports the PASID.
 * A device without a PASID capability (e.g. QEMU's edu, bound through new_id) gets the domain
 * on its requester ID instead (iommu_attach_device), which is what driver_managed_dma allows.
 * The module never requests the BARs: hvtdma maps BAR0 through sysfs resource0, which
 * CONFIG_IO_STRICT_DEVMEM would forbid for a claimed region.
 */
#include <linux/iommu.h>
#include <linux/kref.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/pci-ats.h>
#include <linux/pci.h>
#include <linux/slab.h>
#include <linux/uaccess.h>

#include "hvtpasid.h"

#define HVT_VENDOR 0x1234
#define HVT_DEVICE 0x11f0

struct hvtp_mapping {
	struct list_head node;
	u64 iova;
	unsigned long npages;
	struct page **pages;
};

struct hvtp_dev {
	struct pci_dev *pdev;
	struct iommu_domain *domain;
	ioasid_t pasid; /* IOMMU_NO_PASID: the domain is on the requester ID */
	u32 flags;
	struct miscdevice misc;
	struct mutex lock; /* maps, busy, gone */
	struct list_head maps;
	bool busy; /* /dev/hvtpasid is open */
	bool gone; /* the device was removed: ioctls fail with ENODEV */
	struct kref ref; /* the driver's, and an open file's: the last put frees hd */
};

static void hvtp_free(struct kref *ref)
{
	struct hvtp_dev *hd = container_of(ref, struct hvtp_dev, ref);

	pci_dev_put(hd->pdev);
	kfree(hd);
}

static DEFINE_MUTEX(hvtp_global);
static struct hvtp_dev *hvtp_the; /* one device: one /dev/hvtpasid */

static void hvtp_drop(struct hvtp_dev *hd, struct hvtp_mapping *m)
{
	size_t done = iommu_unmap(hd->domain, m->iova, m->npages << PAGE_SHIFT);

	if (done != m->npages << PAGE_SHIFT)
		pci_warn(hd->pdev, "unmapped %zu of %lu bytes at iova %#llx\n", done,
			 m->npages << PAGE_SHIFT, m->iova);
	unpin_user_pages_dirty_lock(m->pages, m->npages, true);
	list_del(&m->node);
	kvfree(m->pages);
	kfree(m);
}

static long hvtp_map(struct hvtp_dev *hd, struct hvtp_map *req)
{
	struct hvtp_mapping *m, *o;
	unsigned long npages, i;
	int prot = 0, ret;
	long got;

	if (!req->size || (req->uaddr | req->iova | req->size) & ~PAGE_MASK ||
	    req->iova + req->size < req->iova || !(req->prot & (HVTP_READ | HVTP_WRITE)) ||
	    req->prot & ~(HVTP_READ | HVTP_WRITE))
		return -EINVAL;
	npages = req->size >> PAGE_SHIFT;
	if (npages > (256u << 20) >> PAGE_SHIFT)
		return -E2BIG;
	list_for_each_entry(o, &hd->maps, node)
		if (req->iova < o->iova + (o->npages << PAGE_SHIFT) &&
		    o->iova < req->iova + req->size)
			return -EEXIST;
	if (req->prot & HVTP_READ)
		prot |= IOMMU_READ;
	if (req->prot & HVTP_WRITE)
		prot |= IOMMU_WRITE;

	m = kzalloc(sizeof(*m), GFP_KERNEL);
	if (!m)
		return -ENOMEM;
	m->pages = kvcalloc(npages, sizeof(*m->pages), GFP_KERNEL);
	if (!m->pages) {
		kfree(m);
		return -ENOMEM;
	}
	got = pin_user_pages_fast(req->uaddr, npages, FOLL_WRITE | FOLL_LONGTERM, m->pages);
	if (got < 0) {
		ret = got;
		goto free;
	}
	if (got != npages) {
		unpin_user_pages(m->pages, got);
		ret = -EFAULT;
		goto free;
	}
	for (i = 0; i < npages; i++) {
		ret = iommu_map(hd->domain, req->iova + (i << PAGE_SHIFT),
				page_to_phys(m->pages[i]), PAGE_SIZE, prot, GFP_KERNEL);
		if (ret) {
			if (i)
				iommu_unmap(hd->domain, req->iova, i << PAGE_SHIFT);
			unpin_user_pages(m->pages, npages);
			goto free;
		}
	}
	m->iova = req->iova;
	m->npages = npages;
	list_add(&m->node, &hd->maps);
	return 0;
free:
	kvfree(m->pages);
	kfree(m);
	return ret;
}

static long hvtp_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct hvtp_dev *hd = file->private_data;
	void __user *uarg = (void __user *)arg;
	struct hvtp_mapping *m;
	long ret = -ENOTTY;
	bool gone;

	mutex_lock(&hd->lock);
	gone = hd->gone;
	mutex_unlock(&hd->lock);
	if (gone)
		return -ENODEV; /* (MAP checks again under the lock) */
	switch (cmd) {
	case HVTP_GET_INFO: {
		struct hvtp_info info = {
			.pasid = hd->pasid,
			.flags = hd->flags,
			.max_pasids = hd->pdev->dev.iommu ? hd->pdev->dev.iommu->max_pasids : 0,
		};
		u16 ctrl = 0;

		if (hd->pdev->pasid_cap)
			pci_read_config_word(hd->pdev, hd->pdev->pasid_cap + PCI_PASID_CTRL, &ctrl);
		info.pasid_ctrl = ctrl;
		strscpy(info.bdf, pci_name(hd->pdev), sizeof(info.bdf));
		return copy_to_user(uarg, &info, sizeof(info)) ? -EFAULT : 0;
	}
	case HVTP_MAP: {
		struct hvtp_map req;

		if (copy_from_user(&req, uarg, sizeof(req)))
			return -EFAULT;
		mutex_lock(&hd->lock);
		ret = hd->gone ? -ENODEV : hvtp_map(hd, &req);
		mutex_unlock(&hd->lock);
		return ret;
	}
	case HVTP_UNMAP: {
		struct hvtp_unmap req;

		if (copy_from_user(&req, uarg, sizeof(req)))
			return -EFAULT;
		ret = -ENOENT;
		mutex_lock(&hd->lock);
		list_for_each_entry(m, &hd->maps, node) {
			if (m->iova == req.iova) {
				hvtp_drop(hd, m);
				ret = 0;
				break;
			}
		}
		mutex_unlock(&hd->lock);
		return ret;
	}
	}
	return ret;
}

static int hvtp_open(struct inode *inode, struct file *file)
{
	struct hvtp_dev *hd = container_of(file->private_data, struct hvtp_dev, misc);
	int ret = 0;

	mutex_lock(&hd->lock);
	if (hd->busy)
		ret = -EBUSY; /* one user at a time: its mappings live as long as its file */
	hd->busy = true;
	if (!ret)
		kref_get(&hd->ref);
	mutex_unlock(&hd->lock);
	file->private_data = hd;
	return ret;
}

static int hvtp_release(struct inode *inode, struct file *file)
{
	struct hvtp_dev *hd = file->private_data;
	struct hvtp_mapping *m, *n;

	mutex_lock(&hd->lock);
	list_for_each_entry_safe(m, n, &hd->maps, node)
		hvtp_drop(hd, m);
	hd->busy = false;
	mutex_unlock(&hd->lock);
	kref_put(&hd->ref, hvtp_free);
	return 0;
}

static const struct file_operations hvtp_fops = {
	.owner = THIS_MODULE,
	.open = hvtp_open,
	.release = hvtp_release,
	.unlocked_ioctl = hvtp_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
};

static int hvtp_enable_pasid(struct hvtp_dev *hd)
{
	struct pci_dev *pdev = hd->pdev;
	int features = pci_pasid_features(pdev);
	u16 ctrl;
	int ret;

	if (features < 0)
		return features;
	features &= PCI_PASID_CAP_PRIV; /* execute permission: never asked for */
	if (pdev->pasid_enabled) {
		hd->flags |= HVTP_F_PASID_PCI; /* the IOMMU driver did it */
		return 0;
	}
	ret = pci_enable_pasid(pdev, features);
	if (ret == -EINVAL && !pdev->eetlp_prefix_path && !pdev->pasid_no_tlp &&
	    pci_pcie_type(pdev) == PCI_EXP_TYPE_RC_END) {
		pdev->pasid_no_tlp = 1;
		hd->flags |= HVTP_F_NO_TLP;
		ret = pci_enable_pasid(pdev, features);
	}
	if (!ret) {
		hd->flags |= HVTP_F_PASID_PCI;
		return 0;
	}
	pci_info(pdev, "pci_enable_pasid: %d; setting PASID Enable directly\n", ret);
	pci_read_config_word(pdev, pdev->pasid_cap + PCI_PASID_CTRL, &ctrl);
	ctrl |= PCI_PASID_CTRL_ENABLE | features;
	pci_write_config_word(pdev, pdev->pasid_cap + PCI_PASID_CTRL, ctrl);
	hd->flags |= HVTP_F_PASID_RAW;
	return 0;
}

static void hvtp_disable_pasid(struct hvtp_dev *hd)
{
	struct pci_dev *pdev = hd->pdev;
	u16 ctrl;

	if (hd->flags & HVTP_F_PASID_RAW) {
		pci_read_config_word(pdev, pdev->pasid_cap + PCI_PASID_CTRL, &ctrl);
		ctrl &= ~(PCI_PASID_CTRL_ENABLE | PCI_PASID_CTRL_PRIV);
		pci_write_config_word(pdev, pdev->pasid_cap + PCI_PASID_CTRL, ctrl);
	}
	/* a PASID the PCI core enabled stays (the IOMMU driver may rely on it; it did so too) */
	if (hd->flags & HVTP_F_NO_TLP && !pdev->pasid_enabled)
		pdev->pasid_no_tlp = 0;
}

static int hvtp_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct hvtp_dev *hd;
	int ret;

	mutex_lock(&hvtp_global);
	if (hvtp_the) {
		mutex_unlock(&hvtp_global);
		return -EBUSY;
	}
	hd = kzalloc(sizeof(*hd), GFP_KERNEL);
	if (!hd) {
		mutex_unlock(&hvtp_global);
		return -ENOMEM;
	}
	hvtp_the = hd;
	mutex_unlock(&hvtp_global);
	hd->pdev = pci_dev_get(pdev);
	mutex_init(&hd->lock);
	kref_init(&hd->ref);
	INIT_LIST_HEAD(&hd->maps);
	hd->pasid = IOMMU_NO_PASID;

	ret = pci_enable_device_mem(pdev);
	if (ret)
		goto err_free;
	pci_set_master(pdev);

	hd->domain = iommu_paging_domain_alloc(&pdev->dev);
	if (IS_ERR(hd->domain)) {
		ret = PTR_ERR(hd->domain);
		pci_err(pdev, "iommu_paging_domain_alloc: %d (is the IOMMU on?)\n", ret);
		goto err_disable;
	}
	if (pdev->pasid_cap) {
		ret = hvtp_enable_pasid(hd);
		if (ret)
			goto err_domain;
		hd->pasid = iommu_alloc_global_pasid(&pdev->dev);
		if (hd->pasid == IOMMU_PASID_INVALID) {
			pci_err(pdev, "iommu_alloc_global_pasid failed (max_pasids %u)\n",
				pdev->dev.iommu ? pdev->dev.iommu->max_pasids : 0);
			hd->pasid = IOMMU_NO_PASID;
			ret = -ENOSPC;
			goto err_pasid;
		}
		ret = iommu_attach_device_pasid(hd->domain, &pdev->dev, hd->pasid, NULL);
		if (ret) {
			pci_err(pdev, "iommu_attach_device_pasid(%u): %d\n", hd->pasid, ret);
			goto err_pasid;
		}
		hd->flags |= HVTP_F_PASID;
	} else {
		ret = iommu_attach_device(hd->domain, &pdev->dev);
		if (ret) {
			pci_err(pdev, "iommu_attach_device: %d\n", ret);
			goto err_domain;
		}
	}

	hd->misc.minor = MISC_DYNAMIC_MINOR;
	hd->misc.name = "hvtpasid";
	hd->misc.fops = &hvtp_fops;
	hd->misc.parent = &pdev->dev;
	ret = misc_register(&hd->misc);
	if (ret)
		goto err_detach;
	pci_set_drvdata(pdev, hd);
	pci_info(pdev, "hvtpasid: domain attached to %s %u (flags %#x)\n",
		 hd->flags & HVTP_F_PASID ? "PASID" : "RID", hd->pasid, hd->flags);
	return 0;

err_detach:
	if (hd->flags & HVTP_F_PASID)
		iommu_detach_device_pasid(hd->domain, &pdev->dev, hd->pasid);
	else
		iommu_detach_device(hd->domain, &pdev->dev);
err_pasid:
	if (hd->pasid != IOMMU_NO_PASID)
		iommu_free_global_pasid(hd->pasid);
	if (pdev->pasid_cap)
		hvtp_disable_pasid(hd);
err_domain:
	iommu_domain_free(hd->domain);
err_disable:
	pci_clear_master(pdev);
	pci_disable_device(pdev);
err_free:
	mutex_lock(&hvtp_global);
	hvtp_the = NULL;
	mutex_unlock(&hvtp_global);
	kref_put(&hd->ref, hvtp_free);
	return ret;
}

static void hvtp_remove(struct pci_dev *pdev)
{
	struct hvtp_dev *hd = pci_get_drvdata(pdev);
	struct hvtp_mapping *m, *n;

	misc_deregister(&hd->misc); /* no new opens; an open file keeps hd until its release */
	mutex_lock(&hd->lock);
	list_for_each_entry_safe(m, n, &hd->maps, node)
		hvtp_drop(hd, m);
	hd->gone = true;
	mutex_unlock(&hd->lock);
	pci_clear_master(pdev);
	if (hd->flags & HVTP_F_PASID) {
		iommu_detach_device_pasid(hd->domain, &pdev->dev, hd->pasid);
		iommu_free_global_pasid(hd->pasid);
		hvtp_disable_pasid(hd);
	} else {
		iommu_detach_device(hd->domain, &pdev->dev);
	}
	iommu_domain_free(hd->domain);
	pci_disable_device(pdev);
	mutex_lock(&hvtp_global);
	hvtp_the = NULL;
	mutex_unlock(&hvtp_global);
	kref_put(&hd->ref, hvtp_free);
}

static const struct pci_device_id hvtp_ids[] = {
	{ PCI_DEVICE(HVT_VENDOR, HVT_DEVICE) },
	{ }
};
MODULE_DEVICE_TABLE(pci, hvtp_ids);

static struct pci_driver hvtp_driver = {
	.name = "hvtpasid",
	.id_table = hvtp_ids,
	.probe = hvtp_probe,
	.remove = hvtp_remove,
	.driver_managed_dma = true, /* the DMA API is not used; the domain is ours */
};
module_pci_driver(hvtp_driver);

MODULE_DESCRIPTION("PASID-tagged DMA domain for the hvt-pci device (hvtools)");
MODULE_LICENSE("GPL");
