"""The scheduler's own bookkeeping of what it placed where: one ledger for the live scheduler and the
simulator (reservations, prefills sent and not answered, requests decoding, prefixes sent)."""
