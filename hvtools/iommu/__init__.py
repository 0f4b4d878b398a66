"""PURE models of the VT-d IOMMU (Intel VT-d specification 4.x). Imports no adapter."""
