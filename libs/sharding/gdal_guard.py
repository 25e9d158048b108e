"""GDAL locked down for landed data: only the drivers declared formats imply, and no network.

A landed file is hostile until read, and GDAL follows what a file says: an OGR VRT opens the
paths and URLs written in it, a GeoJSON ``crs`` link is fetched over HTTP, ``/vsicurl/`` and
``/vsis3/`` names reach any address. :func:`lock_down_gdal` (idempotent and cheap; call it
before every open of a landed file, in any process) deregisters every driver outside
:data:`ALLOWED_DRIVERS` through GDAL's C API on the libgdal pyogrio loaded (so it holds
whoever imported pyogrio first, and undoes a later re-registration), installs an HTTP fetch
callback that refuses every request, makes ``/vsicurl/`` and its kin refuse every name, and
turns PROJ's network off; then it verifies all of that and fails closed with
:class:`GdalLockdownError`. Why each layer is needed: ``docs/landed-data-guard.md``.
"""

from __future__ import annotations

import ctypes
import os
import re
import threading
from pathlib import Path

import pyogrio

from libs.errors import SpatialEtlError
from libs.manifest import InputFormat

#: The GDAL driver each declared format is read with (GeoParquet is read by pyarrow).
DRIVER_FOR_FORMAT = {
    InputFormat.GEOJSON: "GeoJSON",
    InputFormat.GEOJSONSEQ: "GeoJSONSeq",
    InputFormat.GPKG: "GPKG",
    InputFormat.FLATGEOBUF: "FlatGeobuf",
    InputFormat.SHAPEFILE_ZIP: "ESRI Shapefile",
    InputFormat.CSV: "CSV",
}
#: Every GDAL driver a process reading landed data keeps registered.
ALLOWED_DRIVERS = frozenset(DRIVER_FOR_FORMAT.values())
#: Formats whose driver GDAL 3.12 accepts as a ``<DRIVER>:`` path prefix (FlatGeobuf and
#: Shapefile take the prefix as part of the file name).
PREFIXABLE_FORMATS = frozenset({InputFormat.GEOJSON, InputFormat.GEOJSONSEQ, InputFormat.GPKG,
                                InputFormat.CSV})

_REFUSAL = b"network access is disabled in processes that read landed data"
#: GDAL configuration set while landed data is read. CPL_VSIL_CURL_ALLOWED_FILENAME makes
#: /vsicurl/, /vsis3/ and their kin refuse every name before any request (they use curl
#: directly, not the fetch callback); the proxy is a last layer (curl honours NO_PROXY, so it
#: is not relied on); SQLite external access (ATTACH, VirtualOGR from a file's views) stays off;
#: GDAL does not list the folder of an opened file (a Shapefile in a zip still finds its parts).
LOCKED_DOWN_OPTIONS = {
    "CPL_VSIL_CURL_ALLOWED_FILENAME": "/vsicurl/network-access-is-disabled/",
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".network-access-is-disabled",
    "GDAL_HTTP_PROXY": "127.0.0.1:9",
    "GDAL_HTTPS_PROXY": "127.0.0.1:9",
    "GDAL_HTTP_MAX_RETRY": "0",
    "GDAL_HTTP_TIMEOUT": "1",
    "OGR_SQLITE_ALLOW_EXTERNAL_ACCESS": "NO",
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
}


class GdalLockdownError(SpatialEtlError):
    """GDAL in this process could reach more than the declared formats need: nothing is read."""


class _HttpResult(ctypes.Structure):
    """``CPLHTTPResult`` (cpl_http.h), allocated with GDAL's allocator: GDAL frees it."""

    _fields_ = [("nStatus", ctypes.c_int), ("pszContentType", ctypes.c_void_p),
                ("pszErrBuf", ctypes.c_void_p), ("nDataLen", ctypes.c_int),
                ("nDataAlloc", ctypes.c_int), ("pabyData", ctypes.c_void_p),
                ("papszHeaders", ctypes.c_void_p), ("nMimePartCount", ctypes.c_int),
                ("pasMimePart", ctypes.c_void_p)]


_FETCH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p,
                                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                   ctypes.c_void_p, ctypes.c_void_p)
_CURLE_COULDNT_CONNECT = 7
_lock = threading.Lock()
_state: dict = {}  # the loaded library and the callback (kept alive while GDAL may call it)


def libgdal_path() -> Path:
    """The libgdal shared library pyogrio loaded into this process."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            name = line.rsplit(None, 1)[-1]
            if os.path.basename(name).startswith("libgdal"):
                return Path(name)
    raise GdalLockdownError("pyogrio is imported but no libgdal is mapped into this process; "
                            "cannot lock GDAL down, so no landed file is read")


def _library() -> ctypes.CDLL:
    if "lib" not in _state:
        lib = ctypes.CDLL(str(libgdal_path()))  # the same handle: dlopen of a loaded library
        lib.GDALGetDriverCount.restype = ctypes.c_int
        lib.GDALGetDriver.argtypes = [ctypes.c_int]
        lib.GDALGetDriver.restype = ctypes.c_void_p
        lib.GDALGetDriverShortName.argtypes = [ctypes.c_void_p]
        lib.GDALGetDriverShortName.restype = ctypes.c_char_p
        lib.GDALDeregisterDriver.argtypes = [ctypes.c_void_p]
        lib.GDALDeregisterDriver.restype = None
        lib.CPLCalloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
        lib.CPLCalloc.restype = ctypes.c_void_p
        lib.CPLStrdup.argtypes = [ctypes.c_char_p]
        lib.CPLStrdup.restype = ctypes.c_void_p
        lib.CPLHTTPSetFetchCallback.argtypes = [_FETCH_CALLBACK, ctypes.c_void_p]
        lib.CPLHTTPSetFetchCallback.restype = None
        lib.CPLHTTPFetch.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
        lib.CPLHTTPFetch.restype = ctypes.POINTER(_HttpResult)
        lib.CPLHTTPDestroyResult.argtypes = [ctypes.POINTER(_HttpResult)]
        lib.CPLHTTPDestroyResult.restype = None
        lib.OSRSetPROJEnableNetwork.argtypes = [ctypes.c_int]
        lib.OSRSetPROJEnableNetwork.restype = None
        lib.OSRGetPROJEnableNetwork.restype = ctypes.c_int
        lib.CPLGetConfigOption.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
        lib.CPLGetConfigOption.restype = ctypes.c_char_p
        _state["lib"] = lib
    return _state["lib"]


def registered_drivers() -> list[str]:
    """Short names of every GDAL driver registered in this process (raster ones too)."""
    lib = _library()
    return [lib.GDALGetDriverShortName(lib.GDALGetDriver(i)).decode()
            for i in range(lib.GDALGetDriverCount())]


def _refuse_fetch(url: bytes, *_: object) -> int:
    """CPLHTTPFetch's replacement: a connection error, and no connection."""
    lib = _library()
    result = lib.CPLCalloc(1, ctypes.sizeof(_HttpResult))
    _HttpResult.from_address(result).nStatus = _CURLE_COULDNT_CONNECT
    _HttpResult.from_address(result).pszErrBuf = lib.CPLStrdup(_REFUSAL)
    return result


def lock_down_gdal() -> None:
    """Restrict GDAL in this process to :data:`ALLOWED_DRIVERS` with no network, then verify.

    Idempotent and cheap after the first call: call it before every open of a landed file.
    Raises :class:`GdalLockdownError` when the result cannot be verified.
    """
    with _lock:
        lib = _library()
        for index in reversed(range(lib.GDALGetDriverCount())):
            driver = lib.GDALGetDriver(index)
            if lib.GDALGetDriverShortName(driver).decode() not in ALLOWED_DRIVERS:
                lib.GDALDeregisterDriver(driver)
        if "callback" not in _state:
            _state["callback"] = _FETCH_CALLBACK(_refuse_fetch)
            # process-wide (CPLHTTPPushFetchCallback would hold for the calling thread only)
            lib.CPLHTTPSetFetchCallback(_state["callback"], None)
        if _changed_options():
            pyogrio.set_gdal_config_options(LOCKED_DOWN_OPTIONS)
        lib.OSRSetPROJEnableNetwork(0)
    check_gdal_locked_down()


def _changed_options() -> dict[str, str | None]:
    """Options of :data:`LOCKED_DOWN_OPTIONS` whose value differs, as GDAL reads them (raw)."""
    lib = _library()
    current = {key: lib.CPLGetConfigOption(key.encode(), None) for key in LOCKED_DOWN_OPTIONS}
    return {key: value and value.decode() for key, value in current.items()
            if value != LOCKED_DOWN_OPTIONS[key].encode()}


def check_gdal_locked_down() -> None:
    """Fail closed unless GDAL is restricted as :func:`lock_down_gdal` leaves it."""
    forbidden = sorted(set(registered_drivers()) - ALLOWED_DRIVERS)
    if forbidden:
        raise GdalLockdownError(
            f"GDAL drivers {forbidden} are registered in a process about to read landed data; "
            f"only {sorted(ALLOWED_DRIVERS)} may be: call libs.sharding.lock_down_gdal() first")
    changed = _changed_options()
    if changed:
        raise GdalLockdownError(f"GDAL options {changed} undo the network lock-down; "
                                "call libs.sharding.lock_down_gdal() first")
    lib = _library()
    if lib.OSRGetPROJEnableNetwork():
        raise GdalLockdownError("PROJ's network access is on in a process about to read landed "
                                "data; call libs.sharding.lock_down_gdal() first")
    # ask GDAL's HTTP client itself: the callback answers without touching the network
    result = lib.CPLHTTPFetch(b"http://127.0.0.1:9/landed-data-guard-probe", None)
    try:
        refused = (bool(result) and bool(result.contents.pszErrBuf)
                   and ctypes.string_at(result.contents.pszErrBuf) == _REFUSAL)
    finally:
        if result:
            lib.CPLHTTPDestroyResult(result)
    if not refused:
        raise GdalLockdownError("GDAL's HTTP client is not the refusing callback in a process "
                                "about to read landed data; call libs.sharding.lock_down_gdal()")


_DRIVER_HINT = re.compile(r"\s*It might help to specify the correct driver.*?(?:'CSV:path'\.?|$)",
                          re.DOTALL)
_ABSOLUTE_PATH = re.compile(r"(?<![\w:/.])/(?:[^\s'\"/,;()]+/)+[^\s'\",;()]*")


def clean_gdal_message(message: object, name: str, *local: str | Path) -> str:
    """A GDAL message fit to show: ``local`` paths (the landed copy, the path GDAL was given)
    read as ``name``, any other absolute path as ``<a path>``, no driver-prefix hint (a
    user cannot choose the driver: the manifest's format does)."""
    text = _DRIVER_HINT.sub("", str(message))
    forms = {str(form) for each in local for form in (each, Path(each).resolve())}
    for form in sorted(forms, key=len, reverse=True):
        text = text.replace(form, name)
    return _ABSOLUTE_PATH.sub("<a path>", text)
