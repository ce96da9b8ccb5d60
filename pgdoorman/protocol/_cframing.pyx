# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""
The relay's L{Scanner}, compiled (Cython): the same class as
L{pgdoorman.protocol.framing.Scanner}, which stays the reference.

framing.py uses this one on CPython when it imports (built by ``pip install`` when a compiler
and Cython are there; PGDOORMAN_PURE_PYTHON=1 forces the reference).  What it saves is the
walk over the messages nobody inspects (a DataRow costs a few ns here against a few hundred in
Python); the handler is called exactly as the Python scanner calls it, with the same arguments,
and its answers are read the same way.  tests/test_framing.py runs every Scanner test against
both and checks them against each other on random streams: a change to one is a change to
both.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_FromStringAndSize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize
from cpython.bytes cimport PyBytes_GET_SIZE
from cpython.object cimport PyObject_IsTrue
from cpython.sequence cimport PySequence_Contains
from libc.stdint cimport uint32_t

from pgdoorman.protocol.framing import MAX_MESSAGE as _MAX_MESSAGE
from pgdoorman.protocol.framing import STOP, WHOLE, FramingError

cdef object _WHOLE = WHOLE
cdef object _STOP = STOP
cdef uint32_t MAX_MESSAGE = _MAX_MESSAGE

#: frozenset -> its 256-byte membership table.  The owners switch between a few module-level
#: sets (server.py's _INSPECT and _EVERYTHING), so each table is built once; bounded so that
#: an owner making new sets all the time costs memory no more than 64 tables.
cdef dict _tables = {}


cdef bytes _table_of(object codes):
    table = _tables.get(codes)
    if table is None:
        # `i in codes` for every byte: exactly the answers the Python scanner would get.
        table = bytes([1 if i in codes else 0 for i in range(256)])
        if len(_tables) >= 64:
            _tables.clear()
        _tables[codes] = table
    return table


cdef class Scanner:
    """
    Incremental header walk over one direction of a connection (see the reference,
    L{pgdoorman.protocol.framing.Scanner}, for the contract).

    @ivar inspect: the message codes the handler is asked about; a frozenset is read through
        a 256-byte table, anything else with C{in} at every message, as the reference does.
    """

    cdef public object handle
    cdef public object stopped
    cdef object _inspect
    #: the table of C{_inspect} when it is a frozenset, else NULL.
    cdef bytes _table
    cdef const unsigned char *_bits
    cdef readonly object _held
    cdef readonly Py_ssize_t _need
    cdef readonly Py_ssize_t _remain

    def __init__(self, handle, inspect):
        self.handle = handle
        self.inspect = inspect
        self.stopped = False
        self._held = None
        self._need = 0
        self._remain = 0

    @property
    def inspect(self):
        return self._inspect

    @inspect.setter
    def inspect(self, codes):
        self._inspect = codes
        if type(codes) is frozenset:
            self._table = _table_of(codes)
            self._bits = <const unsigned char *>PyBytes_AS_STRING(self._table)
        else:
            self._table = None
            self._bits = NULL

    @property
    def between_messages(self):
        """Nothing half-read: the next byte starts a message."""
        return self._held is None and not self._remain

    def feed(self, data):
        """
        Scan C{data}; return the bytes to pass on (C{data} itself when nothing was changed),
        or None when there is nothing to pass on yet.

        @raise FramingError: a message length below 4 or above MAX_MESSAGE.
        """
        cdef Py_buffer view
        held = self._held
        if held is not None:
            held += data
            if len(held) < self._need:
                return None
            self._held = None
            data = bytes(held)
        if PyBytes_CheckExact(data):
            return self._scan(data, <const unsigned char *>PyBytes_AS_STRING(data),
                              PyBytes_GET_SIZE(data))
        # Any other bytes-like object (the relay only ever has bytes): read through its
        # buffer, sliced and handed on as itself, as the reference does.
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            return self._scan(data, <const unsigned char *>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    cdef object _scan(self, object data, const unsigned char *p, Py_ssize_t n):
        cdef Py_ssize_t pos = self._remain
        cdef Py_ssize_t start = 0
        cdef Py_ssize_t stop = n
        cdef Py_ssize_t end
        cdef uint32_t length
        cdef unsigned char code
        cdef const unsigned char *bits
        cdef bint asked
        cdef bint exact = PyBytes_CheckExact(data)
        cdef list out = None
        if pos >= n:
            self._remain = pos - n
            return data
        self._remain = 0
        handle = self.handle
        bits = self._bits
        while True:
            if n - pos < 5:
                self._hold(p, pos, n, 5)
                stop = pos
                break
            code = p[pos]
            length = ((<uint32_t>p[pos + 1] << 24) | (<uint32_t>p[pos + 2] << 16)
                      | (<uint32_t>p[pos + 3] << 8) | <uint32_t>p[pos + 4])
            if length < 4 or length > MAX_MESSAGE:
                raise FramingError("invalid message length %d" % length)
            end = pos + 1 + length
            if bits != NULL:
                asked = bits[code]
            else:
                asked = PySequence_Contains(self._inspect, code)
            if asked:
                answer = handle(code, data, pos, end, n)
                bits = self._bits  # the handler may have changed inspect
                if answer is not None:
                    if answer is _WHOLE:
                        self._hold(p, pos, n, end - pos)
                        stop = pos
                        break
                    if answer is _STOP:
                        self.stopped = True
                        stop = pos
                        break
                    if out is None:
                        out = []
                    if pos > start:
                        out.append(_slice(data, p, exact, start, pos))
                    if PyObject_IsTrue(answer):
                        out.append(answer)
                    start = end
            pos = end
            if pos >= n:
                if pos > n:
                    self._remain = pos - n
                break
        if out is None:
            if stop == n:
                return data
            return _slice(data, p, exact, 0, stop) if stop else None
        if start < stop:
            out.append(_slice(data, p, exact, start, stop))
        return b"".join(out)

    cdef void _hold(self, const unsigned char *p, Py_ssize_t pos, Py_ssize_t n,
                    Py_ssize_t need):
        self._held = PyByteArray_FromStringAndSize(<const char *>(p + pos), n - pos)
        self._need = need


cdef inline object _slice(object data, const unsigned char *p, bint exact, Py_ssize_t a,
                          Py_ssize_t b):
    """C{data[a:b]}: a new bytes from the pointer when C{data} is bytes, else its own slice."""
    if exact:
        return PyBytes_FromStringAndSize(<const char *>(p + a), b - a)
    return data[a:b]
