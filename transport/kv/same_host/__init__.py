"""The same-host KV path: when the prefill and the decode worker run on one host, chunks travel
through shared memory instead of the socket.

The decode side (the p2p endpoint) lends each same-host transfer a *ring*: a memfd of a few
slots' worth of bytes, created by the receiver, mode 0600, with no name in any file system. Its
``KvAccept`` names the ring (pid, fd, inode, slots); the sender maps it through
``/proc/<pid>/fd/<fd>`` (which the kernel opens only for the receiver's own user, or root), writes
each chunk (at most a slot) right after the previous one while hashing it, and sends a
``KvShmChunk`` (which rows, the checksums) on the ordinary KV connection. The receiver finds the
chunk where the sender put it (both run ``ring.place``), verifies it span by span and copies it
into its sink, then returns credit, which frees its place: the credit window is the ring. Begin,
accept, credit, end, ack/nack, abort, deadlines and the transfer ids are those of the TCP path;
only the bytes move differently. See ``transport/PROTOCOL.md``.

Who may see what: the ring can be opened only between the offer and the sender's first chunk
(the sender keeps no fd of it, and the receiver drops its own once that chunk arrives: the ring
is *sealed*, reachable only through the two mappings). A ring is lent to one transfer at a time
and, once that transfer succeeded, only ever again to the same sender connection, which still
maps it, so a sender only sees bytes it wrote itself; a ring whose transfer failed is closed,
never reused. Neither the receiver's KV cache nor another
sender's data is ever in a segment. Rings live in memfds, so a crash of either side leaves
nothing behind: the kernel frees a ring with the last process that maps it.
"""

from transport.kv.same_host.identity import SameHostMode, host_identity

__all__ = ["SameHostMode", "host_identity"]
