# cryptography >= 49 for a nixpkgs that has an older one (nixos-26.05; nix/README.md,
# "The cryptography version"): PyPI's manylinux wheel, pinned by its hash, its one native
# library patched to the store's libc and libgcc_s.
#
# Why the wheel and not the source: building from the sdist needs its Rust crates vendored
# (`rustPlatform.fetchCargoVendor`), whose hash can only be computed with crates.io reachable,
# and this was written where only PyPI is. The wheel is also exactly what the unit tests run
# against: its 120 files are byte for byte the cryptography installed in the checkout's
# virtualenv (RECORD compared), OpenSSL statically inside `_rust.abi3.so`, so the image's
# HPKE (ML-KEM-768 + X25519) is the OpenSSL build the tests exercised, not nixpkgs' OpenSSL.
# The trade-off: a binary built by pyca's CI in a reproducible image. Its hash is pinned, so
# the image, and what the TPM measures of it, still reproduces.
#
# Checked by tests/integration/test_nix.py: the version satisfies pyproject.toml's
# requirement, the URL names that version and the wheel tag, the SRI hash is the sha256
# below. Checked by hand once (the tests have no network): that sha256 is PyPI's index's
# digest of the file and that of the file downloaded from this URL.
{
  lib,
  stdenv,
  buildPythonPackage,
  fetchurl,
  autoPatchelfHook,
  pythonOlder,
  cffi,
}:
let
  version = "51.0.1";
  # cp311-abi3: CPython >= 3.11, any later minor version (the stable ABI).
  # manylinux_2_34: glibc >= 2.34.
  wheel = "cryptography-${version}-cp311-abi3-manylinux_2_34_x86_64.whl";
in
# The wheel's metadata: Requires-Dist cffi>=2.0.0 (not PyPy). Said here rather than found out
# by the runtime-dependency check halfway through a build.
assert lib.assertMsg (lib.versionAtLeast cffi.version "2.0.0") ''
  cryptography ${version} needs cffi >= 2.0.0; this nixpkgs has ${cffi.version}.
'';
buildPythonPackage {
  pname = "cryptography";
  inherit version;
  format = "wheel";
  disabled = pythonOlder "3.11";

  src = fetchurl {
    url = "https://files.pythonhosted.org/packages/fa/c2/26ca25185c0c1c42b6fbb1ec514c6fdf139be1d791c9071fd36d88987503/${wheel}";
    # sha256 17805e0fa1d90997b0841d4091e7f96b333af9ad5807f6dfee3ea2e630f5ed54
    hash = "sha256-F4BeD6HZCZewhB1Akef5azM6+a1YB/bf7j6i5jD17VQ=";
  };

  # cryptography/hazmat/bindings/_rust.abi3.so needs libgcc_s.so.1, libc.so.6 and
  # ld-linux-x86-64.so.2 (readelf -d), nothing else: OpenSSL is linked in statically.
  nativeBuildInputs = [ autoPatchelfHook ];
  buildInputs = [ (lib.getLib stdenv.cc.cc) ];

  dependencies = [ cffi ];

  # A wheel ships no tests; the embassy's unit tests (run in its own build) exercise it.
  pythonImportsCheck = [
    "cryptography"
    "cryptography.hazmat.primitives.hpke"
  ];

  meta = {
    description = "Cryptographic recipes and primitives for Python (PyPI's manylinux wheel)";
    homepage = "https://github.com/pyca/cryptography";
    changelog = "https://cryptography.io/en/latest/changelog/";
    license = with lib.licenses; [
      asl20
      bsd3
    ];
    platforms = [ "x86_64-linux" ];
    sourceProvenance = [ lib.sourceTypes.binaryNativeCode ];
  };
}
