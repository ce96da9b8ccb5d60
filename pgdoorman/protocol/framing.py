"""
Framing: where one protocol message ends and the next begins, in a stream of bytes.

Every regular message is a one-byte code and an int32 length that counts itself (PostgreSQL
docs 55.7, "Message Formats").  Two shapes of reader need that:

  - L{MessageBuffer}, for the low-volume phases (login, authentication, the admin console):
    whole messages as (code, payload) pairs.
  - L{Scanner}, for the relay: it walks the headers of whatever arrived and hands only the
    messages its owner asks about to a handler; everything else passes through untouched and
    in bulk, even a message whose body is still arriving (a 1 GB DataRow is streamed, never
    held).

Both reassemble split messages in a bytearray, so a large message that arrives in many reads
costs one copy, not one per read.

The Scanner defined here is the reference; on CPython, C{Scanner} is its compiled twin from
protocol/_cframing.pyx when that was built (see the end of this module).
"""

from __future__ import annotations

import os
import platform
import struct
from typing import Callable, List, Optional, Tuple

_unpack_len = struct.Struct("!I").unpack_from

#: PostgreSQL refuses any message over 1 GB (MaxAllocSize); so do we, before it goes anywhere.
MAX_MESSAGE = 0x3FFFFFFF


class FramingError(ValueError):
    """The stream cannot be framed any more: a length no message can have."""


class _Whole:
    """Answer of a L{Scanner} handler: call me again when the whole message is here."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "WHOLE"


class _Stop:
    """Answer of a L{Scanner} handler: pass nothing from this message on and stop scanning."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "STOP"


WHOLE = _Whole()
STOP = _Stop()

#: A handler: (code, buffer, start, end, available) -> None (pass the message on as it is),
#: bytes (send these instead; b"" drops it), L{WHOLE} or L{STOP}.  C{end} may lie beyond
#: C{available} when the message is not all here yet.
Handler = Callable[[int, bytes, int, int, int], object]


class Scanner:
    """
    Incremental header walk over one direction of a connection.

    @ivar inspect: the message codes the handler is asked about; the owner may change it
        between (or during) calls, the scan reads it at every message.
    @ivar stopped: a handler answered L{STOP}; nothing more is scanned.
    """

    __slots__ = ("handle", "inspect", "stopped", "_held", "_need", "_remain")

    def __init__(self, handle: Handler, inspect):
        self.handle = handle
        self.inspect = inspect
        self.stopped = False
        #: the start of a message that must be seen whole (or a split header), growing.
        self._held: Optional[bytearray] = None
        self._need = 0
        #: bytes of a passed-through message still to come; they are passed on unread.
        self._remain = 0

    @property
    def between_messages(self) -> bool:
        """Nothing half-read: the next byte starts a message."""
        return self._held is None and not self._remain

    def feed(self, data: bytes) -> Optional[bytes]:
        """
        Scan C{data}; return the bytes to pass on (C{data} itself when nothing was changed),
        or None when there is nothing to pass on yet.

        @raise FramingError: a message length below 4 or above L{MAX_MESSAGE}.
        """
        held = self._held
        if held is not None:
            held += data
            if len(held) < self._need:
                return None
            self._held = None
            data = bytes(held)
        n = len(data)
        pos = self._remain
        if pos >= n:
            self._remain = pos - n
            return data
        self._remain = 0
        handle = self.handle
        inspect = self.inspect
        out: Optional[List[bytes]] = None
        start = 0
        stop = n
        while pos < n:
            if n - pos < 5:
                self._hold(data, pos, 5)
                stop = pos
                break
            code = data[pos]
            length = _unpack_len(data, pos + 1)[0]
            if length < 4 or length > MAX_MESSAGE:
                raise FramingError("invalid message length %d" % length)
            end = pos + 1 + length
            if code in inspect:
                answer = handle(code, data, pos, end, n)
                inspect = self.inspect  # the handler may have changed it
                if answer is not None:
                    if answer is WHOLE:
                        self._hold(data, pos, end - pos)
                        stop = pos
                        break
                    if answer is STOP:
                        self.stopped = True
                        stop = pos
                        break
                    if out is None:
                        out = []
                    if pos > start:
                        out.append(data[start:pos])
                    if answer:
                        out.append(answer)
                    start = end
            pos = end
        else:
            if pos > n:
                self._remain = pos - n
        if out is None:
            if stop == n:
                return data
            return data[:stop] if stop else None
        if start < stop:
            out.append(data[start:stop])
        return b"".join(out)

    def _hold(self, data: bytes, pos: int, need: int) -> None:
        self._held = bytearray(memoryview(data)[pos:])
        self._need = need


class MessageBuffer:
    """
    Whole messages from a stream, for the phases where every message is read (login,
    authentication, the admin console).  At most C{limit} bytes of one message are held: a
    client cannot make us allocate a gigabyte by announcing one.
    """

    __slots__ = ("limit", "_buf")

    def __init__(self, limit: int = MAX_MESSAGE):
        self.limit = limit
        self._buf = bytearray()

    def __len__(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> List[Tuple[int, bytes]]:
        """
        Add C{data}; return the complete (code, payload) messages now available, in order.

        @raise FramingError: an impossible length, or a message over C{limit}.
        """
        buf = self._buf
        buf += data
        out = []
        pos = 0
        n = len(buf)
        while n - pos >= 5:
            length = _unpack_len(buf, pos + 1)[0]
            if length < 4 or length > MAX_MESSAGE:
                raise FramingError("invalid message length %d" % length)
            if length + 1 > self.limit:
                raise FramingError("message too long (%d bytes)" % length)
            end = pos + 1 + length
            if end > n:
                break
            out.append((buf[pos], bytes(buf[pos + 5:end])))
            pos = end
        if pos:
            del buf[:pos]
        return out

    def take(self) -> bytes:
        """The bytes held (an incomplete message, or what follows the last one read)."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest

    def push_back(self, messages: List[Tuple[int, bytes]]) -> None:
        """Put messages read but not handled back in front, to be read again later."""
        if not messages:
            return
        framed = b"".join(bytes((code,)) + struct.pack("!I", len(p) + 4) + p
                          for code, p in messages)
        self._buf[:0] = framed


#: The pure-Python Scanner: the reference, which protocol/_cframing.pyx must match.
PyScanner = Scanner
#: C{Scanner} is the compiled one (protocol/_cframing.pyx).  CPython only: PyPy runs the pure
#: one faster than any extension it must reach through cpyext.  PGDOORMAN_PURE_PYTHON=1 keeps
#: the reference, to compare the two or to rule the extension out.
COMPILED = False
if platform.python_implementation() == "CPython" and \
        os.environ.get("PGDOORMAN_PURE_PYTHON", "") != "1":
    try:
        from pgdoorman.protocol._cframing import Scanner  # noqa: F811
    except ImportError:
        pass
    else:
        COMPILED = True
