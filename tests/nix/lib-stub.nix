# A stand-in for exactly the parts of nixpkgs' `lib` and `pkgs` that nix/module.nix,
# nix/hardening.nix and nix/settings-options.nix use, so that they evaluate under the
# Debian Nix 2.8 of the test machine, which cannot fetch or evaluate nixpkgs itself.
#
# Options, types and properties are plain attrsets that tests/nix/eval-module.nix
# interprets: a type carries a working `check` (and, for composite types, its element
# types), a property (mkIf, mkMerge, mkOverride) is tagged with `_type` the way nixpkgs tags
# its own. Packages are attrsets with an `outPath`, so they interpolate into strings and
# print as store paths; pkgs.writeText keeps its text inspectable.
let
  inherit (builtins)
    all
    any
    attrNames
    concatStringsSep
    elem
    filter
    isAttrs
    isBool
    isInt
    isList
    isString
    isPath
    listToAttrs
    map
    stringLength
    substring
    toJSON
    ;

  # ---- properties (nixpkgs lib/modules.nix) ---------------------------------------------------
  mkIf = condition: content: {
    _type = "if";
    inherit condition content;
  };
  mkMerge = contents: {
    _type = "merge";
    inherit contents;
  };
  mkOverride = priority: content: {
    _type = "override";
    inherit priority content;
  };
  mkOptionDefault = mkOverride 1500;
  mkDefault = mkOverride 1000;
  mkForce = mkOverride 50;

  # ---- options ---------------------------------------------------------------------------------
  mkOption = attrs: attrs // { _type = "option"; };
  mkEnableOption =
    name:
    mkOption {
      type = types.bool;
      default = false;
      example = true;
      description = "Whether to enable ${name}.";
    };
  literalExpression = text: {
    _type = "literalExpression";
    inherit text;
  };

  # ---- types -----------------------------------------------------------------------------------
  # `kind` tells the evaluator how to merge; `check` is the test of one definition's value.
  mkType =
    attrs:
    {
      _type = "type";
      kind = "scalar";
    }
    // attrs;

  isDerivationLike = v: isAttrs v && v ? outPath;
  isStringLike = v: isString v || isPath v || isDerivationLike v;

  types = rec {
    str = mkType {
      name = "str";
      description = "string";
      check = isString;
    };
    int = mkType {
      name = "int";
      description = "signed integer";
      check = isInt;
    };
    bool = mkType {
      name = "bool";
      description = "boolean";
      check = isBool;
    };
    package = mkType {
      name = "package";
      description = "package";
      check = isDerivationLike;
    };
    # As nixpkgs: anything coercible to a string that starts with "/".
    path = mkType {
      name = "path";
      description = "path";
      check = v: isStringLike v && substring 0 1 (toString v) == "/";
    };
    enum =
      values:
      mkType {
        name = "enum";
        description = "one of ${concatStringsSep ", " (map toJSON values)}";
        check = v: elem v values;
      };
    ints = {
      between =
        lo: hi:
        mkType {
          name = "intBetween";
          description = "integer between ${toString lo} and ${toString hi} (both inclusive)";
          check = v: isInt v && v >= lo && v <= hi;
        };
      positive = mkType {
        name = "positiveInt";
        description = "positive integer, meaning >0";
        check = v: isInt v && v > 0;
      };
      unsigned = mkType {
        name = "unsignedInt";
        description = "unsigned integer, meaning >=0";
        check = v: isInt v && v >= 0;
      };
    };
    listOf =
      elemType:
      mkType {
        name = "listOf";
        kind = "list";
        description = "list of (${elemType.description})";
        check = isList;
        inherit elemType;
      };
    attrsOf =
      elemType:
      mkType {
        name = "attrsOf";
        kind = "attrs";
        description = "attribute set of (${elemType.description})";
        check = isAttrs;
        inherit elemType;
      };
    nullOr =
      elemType:
      mkType {
        name = "nullOr";
        kind = "nullOr";
        description = "null or ${elemType.description}";
        check = v: v == null || elemType.check v;
        inherit elemType;
      };
    either =
      left: right:
      mkType {
        name = "either";
        kind = "either";
        description = "${left.description} or ${right.description}";
        check = v: left.check v || right.check v;
        inherit left right;
      };
    submodule =
      module:
      mkType {
        name = "submodule";
        kind = "submodule";
        description = "submodule";
        check = v: isAttrs v && !(v ? outPath);
        options = (if builtins.isFunction module then module { } else module).options;
      };
  };

  # ---- the rest of lib, as far as the modules use it ----------------------------------------------
  hasPrefix = prefix: text: substring 0 (stringLength prefix) text == prefix;
  removePrefix =
    prefix: text:
    if hasPrefix prefix text then
      substring (stringLength prefix) (stringLength text - stringLength prefix) text
    else
      text;

  lib = {
    inherit
      mkIf
      mkMerge
      mkOverride
      mkDefault
      mkForce
      mkOptionDefault
      mkOption
      mkEnableOption
      literalExpression
      types
      hasPrefix
      removePrefix
      all
      any
      attrNames
      concatStringsSep
      elem
      filter
      ;
    inherit (builtins) replaceStrings mapAttrs;
    attrValues = set: map (name: set.${name}) (attrNames set);
    concatLists = builtins.concatLists;
    concatMap = builtins.concatMap;
    filterAttrs =
      pred: set:
      listToAttrs (
        map (name: {
          inherit name;
          value = set.${name};
        }) (filter (name: pred name set.${name}) (attrNames set))
      );
    optional = cond: value: if cond then [ value ] else [ ];
    optionals = cond: values: if cond then values else [ ];
    optionalString = cond: text: if cond then text else "";
    optionalAttrs = cond: set: if cond then set else { };
    toUpper = lib.replaceStrings lowerChars upperChars;
  };
  lowerChars = [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ];
  upperChars = [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ];

  # ---- pkgs ----------------------------------------------------------------------------------------
  fakePackage = name: {
    type = "derivation";
    inherit name;
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
  };
  pkgs = {
    writeText = name: text: fakePackage name // { inherit text; };
    # The embassy package (the module's default), named after the file it would build.
    callPackage = path: _args: fakePackage "callPackage-${baseNameOf (toString path)}";
    curl = fakePackage "curl";
    coreutils = fakePackage "coreutils";
    docker = fakePackage "docker";
    swtpm = fakePackage "swtpm";
    tpm2-tools = fakePackage "tpm2-tools";
  };
in
{
  inherit lib pkgs fakePackage;
}
