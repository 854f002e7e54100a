"""The one compiled part: the KV plane's checked copy (transport/kv/copy_checksum.c).

Optional: where it cannot be built (no C compiler, a big-endian or 32-bit host) the install goes on
and transport.kv.checksum copies and hashes in two passes instead, with the same digests.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "transport.kv._copy_checksum",
            ["transport/kv/copy_checksum.c"],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)
