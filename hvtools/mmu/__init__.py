"""PURE models of x86 paging, EPT/NPT, nested and shadow paging (Intel SDM, AMD APM)."""
