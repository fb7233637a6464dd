"""cocoon.guest_image: builds and caches the guest (kernel, first-stage initrd, root image).

May import: the standard library and cocoon.agent (only to locate its source files).
"""
