"""Just enough of pprof's protobuf to list (value, function names) per sample, without
dependencies (the benchmark machines have no protobuf module)."""


def _varint(b, i):
    v = shift = 0
    while True:
        c = b[i]
        i += 1
        v |= (c & 0x7F) << shift
        shift += 7
        if c < 0x80:
            return v, i


def _fields(b):
    """(field number, wire type, value) of a message: ints for varints, bytes otherwise."""
    i = 0
    while i < len(b):
        key, i = _varint(b, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _varint(b, i)
        elif wire == 2:
            n, i = _varint(b, i)
            v, i = b[i:i + n], i + n
        elif wire == 1:
            v, i = b[i:i + 8], i + 8
        elif wire == 5:
            v, i = b[i:i + 4], i + 4
        else:
            raise ValueError(f"wire type {wire}")
        yield field, wire, v


def _ints(wire, v):
    """A repeated integer field's values (packed or not)."""
    if wire == 0:
        return [v]
    out, i = [], 0
    while i < len(v):
        x, i = _varint(v, i)
        out.append(x)
    return out


def samples(data):
    """[(first value, {function names})] of an uncompressed pprof profile."""
    strings, funcs, locs, raw = [], {}, {}, []
    for f, w, v in _fields(data):
        if f == 6:
            strings.append(v.decode("utf-8", "replace"))
        elif f == 5:
            fid = name = 0
            for ff, _, vv in _fields(v):
                if ff == 1:
                    fid = vv
                elif ff == 2:
                    name = vv
            funcs[fid] = name
        elif f == 4:
            lid, fids = 0, []
            for ff, ww, vv in _fields(v):
                if ff == 1:
                    lid = vv
                elif ff == 4:
                    fids += [vvv for fff, _, vvv in _fields(vv) if fff == 1]
            locs[lid] = fids
        elif f == 2:
            lids, values = [], []
            for ff, ww, vv in _fields(v):
                if ff == 1:
                    lids += _ints(ww, vv)
                elif ff == 2:
                    values += _ints(ww, vv)
            raw.append((values[0] if values else 0, lids))
    out = []
    for value, lids in raw:
        names = {strings[funcs[fid]] for lid in lids for fid in locs.get(lid, []) if funcs.get(fid, 0) < len(strings)}
        out.append((value, names))
    return out
