"""GDAL opens only what the manifest declares: the byte sniffer, the driver allow-list, the
network lock-down and clean messages (``libs.sharding.sniffing`` and ``gdal_guard``)."""

import ctypes
import zipfile

import pyogrio
import pytest

from libs.errors import InputDataError
from libs.manifest import DataFile
from libs.sample_batch import NATURAL_EARTH_DIR, synthetic_points
from libs.sharding import (
    ALLOWED_DRIVERS,
    GdalLockdownError,
    check_gdal_locked_down,
    lock_down_gdal,
    plan_layers,
)
from libs.sharding.gdal_guard import clean_gdal_message, libgdal_path, registered_drivers
from libs.sharding.inputs import MAX_CPG_BYTES
from libs.sharding.sniffing import check_declared_format, describe_content

FORMATS = ["geojson", "geojsonseq", "gpkg", "flatgeobuf", "shapefile_zip", "csv"]


def data_file(name: str, fmt: str, source_crs: str | None = None) -> DataFile:
    csv = {"wkt_column": "wkt"} if fmt == "csv" else None
    return DataFile(path=f"incoming/{name}", layer="points", format=fmt, source_crs=source_crs,
                    csv=csv)


def write_valid(folder, fmt: str):
    frame = synthetic_points(5, seed=3)
    path = folder / {"geojson": "p.geojson", "geojsonseq": "p.geojsonl", "gpkg": "p.gpkg",
                     "flatgeobuf": "p.fgb", "shapefile_zip": "p.zip", "csv": "p.csv"}[fmt]
    if fmt == "shapefile_zip":
        with zipfile.ZipFile(path, "w") as archive:
            for part in NATURAL_EARTH_DIR.glob("naturalearth_lowres.*"):
                archive.write(part, arcname=f"countries{part.suffix}")
    elif fmt == "csv":
        path.write_text("id,wkt\n" + "".join(f"{i},{g.wkt}\n" for i, g in enumerate(frame.geometry)))
    else:
        driver = {"geojson": "GeoJSON", "geojsonseq": "GeoJSONSeq", "gpkg": "GPKG",
                  "flatgeobuf": "FlatGeobuf"}[fmt]
        pyogrio.write_dataframe(frame, path, driver=driver)
    return path


def vrt(*sources: str) -> str:
    layers = "".join(f'<OGRVRTLayer name="l{i}"><SrcDataSource>{src}</SrcDataSource></OGRVRTLayer>'
                     for i, src in enumerate(sources))
    return f"<OGRVRTDataSource>{layers}</OGRVRTDataSource>"


@pytest.fixture
def canary(tmp_path):
    path = tmp_path / "canary-outside-the-batch.geojson"
    path.write_text('{"type": "FeatureCollection", "features": []}')
    return path


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_passes_its_sniff_and_plans(tmp_path, fmt):
    path = write_valid(tmp_path, fmt)
    crs = {"shapefile_zip": "EPSG:4326", "csv": "EPSG:3857"}.get(fmt)  # the others carry theirs
    declared = data_file(path.name, fmt, source_crs=crs)
    check_declared_format(path, declared)
    assert list(plan_layers([(path, declared)])) == ["points"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_vrt_disguised_as_any_format_is_refused_before_gdal(tmp_path, fmt, canary):
    path = tmp_path / "x.landed"
    path.write_text(vrt(str(canary), "/vsicurl/http://127.0.0.1:9/x.geojson"))
    with pytest.raises(InputDataError) as caught:
        plan_layers([(path, data_file("x.landed", fmt))])
    message = str(caught.value)
    assert message.startswith("file 'incoming/x.landed' (layer 'points'): declared "
                              f"{fmt} but its bytes are an XML document (OGR VRT)"), message
    assert str(tmp_path) not in message and "canary" not in message


def test_a_vrt_inside_a_shapefile_zip_is_refused(tmp_path, canary):
    path = tmp_path / "c.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for part in NATURAL_EARTH_DIR.glob("naturalearth_lowres.*"):
            if part.suffix != ".shp":
                archive.write(part, arcname=f"countries{part.suffix}")
        archive.writestr("countries.shp", vrt(str(canary)))
    with pytest.raises(InputDataError, match=r"'incoming/c.zip'.*zip member 'countries.shp' is "
                                             r"not a Shapefile part"):
        plan_layers([(path, data_file("c.zip", "shapefile_zip"))])


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_empty_file_is_refused(tmp_path, fmt):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    with pytest.raises(InputDataError, match=f"declared {fmt} but its bytes are an empty file"):
        check_declared_format(path, data_file("empty", fmt))


def test_a_byte_order_mark_is_looked_through(tmp_path):
    path = write_valid(tmp_path, "geojson")
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    check_declared_format(path, data_file(path.name, "geojson"))
    assert plan_layers([(path, data_file(path.name, "geojson"))])["points"]
    path.write_bytes(b"\xef\xbb\xbf \n" + vrt("/etc/hostname").encode())
    assert describe_content(path) == "an XML document (OGR VRT)"
    path.write_bytes(b"\xff\xfe" + "\n {}".encode("utf-16-le"))  # UTF-16 with its BOM
    assert describe_content(path) == "JSON text"


def test_an_sqlite_database_that_is_not_a_geopackage_is_refused(tmp_path):
    path = write_valid(tmp_path, "gpkg")
    data = bytearray(path.read_bytes())
    data[68:72] = b"\x00\x00\x00\x00"
    path.write_bytes(bytes(data))
    with pytest.raises(InputDataError, match=r"declared gpkg but its bytes are an SQLite database "
                                             r"that is not a GeoPackage"):
        check_declared_format(path, data_file(path.name, "gpkg"))


def test_an_oversized_cpg_is_refused_without_inflating_it(tmp_path):
    path = tmp_path / "c.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for part in NATURAL_EARTH_DIR.glob("naturalearth_lowres.*"):
            if part.suffix != ".cpg":
                archive.write(part, arcname=f"countries{part.suffix}")
        archive.writestr("countries.cpg", "UTF-8" + " " * 100_000)
    with pytest.raises(InputDataError, match=rf"zip member 'countries.cpg' inflates to 100,005 "
                                             rf"bytes.*at most {MAX_CPG_BYTES}"):
        plan_layers([(path, data_file("c.zip", "shapefile_zip"))])


def test_after_lock_down_only_the_declared_formats_drivers_are_registered():
    lock_down_gdal()
    assert set(registered_drivers()) == ALLOWED_DRIVERS
    assert {"OGR_VRT", "VRT", "WMS", "WMTS", "WFS", "OAPIF", "HTTP", "GDALG", "STACIT",
            "SQLite"}.isdisjoint(pyogrio.list_drivers())


def test_a_vrt_fails_under_any_name_once_locked_down(tmp_path, canary):
    lock_down_gdal()
    for name in ("x.vrt", "x.geojson", "x.gpkg"):
        path = tmp_path / name
        path.write_text(vrt(str(canary)))
        for gdal_path in (str(path), f"GeoJSON:{path}", f"GPKG:{path}"):
            with pytest.raises(pyogrio.errors.DataSourceError) as caught:
                pyogrio.read_info(gdal_path)
            assert "canary" not in str(caught.value)


def test_a_re_registration_is_caught_and_undone():
    lock_down_gdal()
    ctypes.CDLL(str(libgdal_path())).GDALAllRegister()  # as another library might
    with pytest.raises(GdalLockdownError, match=r"GDAL drivers \[.*'OGR_VRT'.*\] are registered"):
        check_gdal_locked_down()
    lock_down_gdal()
    assert set(registered_drivers()) == ALLOWED_DRIVERS


def test_an_undone_network_option_is_caught_and_restored():
    lock_down_gdal()
    pyogrio.set_gdal_config_options({"CPL_VSIL_CURL_ALLOWED_FILENAME": None})
    with pytest.raises(GdalLockdownError, match="CPL_VSIL_CURL_ALLOWED_FILENAME"):
        check_gdal_locked_down()
    lock_down_gdal()
    check_gdal_locked_down()


def test_no_url_is_fetched_even_where_curl_would_bypass_the_proxy(tmp_path, listener, monkeypatch):
    port, accepted = listener
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")  # curl reads it at each request
    # a GeoJSON "link" CRS is fetched over HTTP by the GeoJSON driver itself
    path = tmp_path / "linked.geojson"
    path.write_text('{"type": "FeatureCollection", "crs": {"type": "link", "properties": '
                    f'{{"href": "http://127.0.0.1:{port}/crs.wkt", "type": "ogcwkt"}}}}, '
                    '"features": [{"type": "Feature", "properties": {}, '
                    '"geometry": {"type": "Point", "coordinates": [1, 2]}}]}')
    plan_layers([(path, data_file("linked.geojson", "geojson"))])
    for url in (f"/vsicurl/http://127.0.0.1:{port}/x.geojson", f"http://127.0.0.1:{port}/x.fgb",
                f"GeoJSON:http://127.0.0.1:{port}/x.geojson", "/vsis3/bucket/x.fgb",
                f"/vsizip//vsicurl/http://127.0.0.1:{port}/x.zip/x.shp"):
        with pytest.raises(pyogrio.errors.DataSourceError):
            pyogrio.read_info(url)
    assert accepted == []


def test_gdal_messages_carry_no_local_path():
    scratch = "/tmp/shard-abc/landed/0/points.geojson"
    message = (f"'{scratch}' not recognized as a supported file format. It might help to specify "
               "the correct driver explicitly by prefixing the file path with '<DRIVER>:', e.g. "
               "'CSV:path'. Failed to open datasource '/etc/hostname' via GeoJSON:" + scratch)
    cleaned = clean_gdal_message(message, "points.geojson", scratch, f"GeoJSON:{scratch}")
    assert cleaned == ("'points.geojson' not recognized as a supported file format. Failed to open "
                       "datasource '<a path>' via points.geojson")
