# A small NixOS-style module evaluator over tests/nix/lib-stub.nix, for Nix 2.8:
#
#   nix-instantiate --eval --strict --json tests/nix/eval-module.nix \
#     --argstr modulesJSON '["nix/module.nix"]' \
#     --argstr configJSON '{"services": {"embassy": {"enable": true}}}'
#
# It does what the tests need of nixpkgs' lib.evalModules, in the same way: modules are
# functions of the final config (a lazy fixpoint); mkIf/mkMerge/mkOverride are pushed down
# to the values they wrap, so which attributes exist never depends on a condition; at an
# option, the active definitions of the highest priority are type-checked (errors name the
# option path) and merged by type, submodules recursively, defaults filling the rest. A
# definition under a namespace that declares options but not that one is an error, as in
# nixpkgs; paths no module declares (systemd.services, boot.kernelModules, ...) are taken
# as given, lists concatenated, other values required to agree.
#
# The result is JSON-able: the config (inactive definitions removed), the declared options
# (their types and nested options), the failed assertions and the rendered config text.
{
  modulesJSON ? ''["nix/module.nix"]'',
  configJSON ? "{}",
}:
let
  stub = import ./lib-stub.nix;
  inherit (stub) lib pkgs;
  inherit (builtins)
    all
    any
    attrNames
    concatLists
    concatMap
    concatStringsSep
    elemAt
    filter
    foldl'
    fromJSON
    genList
    head
    isAttrs
    isBool
    isFunction
    isInt
    isList
    isPath
    isString
    length
    listToAttrs
    mapAttrs
    toJSON
    typeOf
    ;

  root = ../..;

  # ---- modules ---------------------------------------------------------------------------------
  moduleArgs = {
    inherit config lib pkgs;
    modulesPath = "/nixpkgs-stub/nixos/modules";
  };
  load =
    m:
    let
      value = if isPath m then import m else m;
    in
    if isFunction value then value moduleArgs else value;
  collect =
    ms:
    concatMap (
      m:
      let
        module = load m;
      in
      [ module ] ++ collect (module.imports or [ ])
    ) ms;
  modules = collect (
    map (p: root + "/${p}") (fromJSON modulesJSON) ++ [ { config = fromJSON configJSON; } ]
  );
  # A module is { options; config; imports; } or, in short, its config alone.
  definitionOf =
    module:
    if module ? config || module ? options then
      module.config or { }
    else
      removeAttrs module [
        "imports"
        "meta"
        "_file"
      ];

  # ---- helpers -------------------------------------------------------------------------------------
  tagOf = v: if isAttrs v then v._type or null else null;
  isOption = v: tagOf v == "option";
  # An attrset that is a subtree of the config, not a value (a package, a tagged value).
  isPlainAttrs = v: isAttrs v && !(v ? outPath) && !(v ? _type);
  attrValues = set: map (n: set.${n}) (attrNames set);
  unique = foldl' (acc: x: if builtins.elem x acc then acc else acc ++ [ x ]) [ ];
  showPath = path: concatStringsSep "." path;
  show =
    v:
    if isString v || isInt v || isBool v || v == null then
      toJSON v
    else if isList v then
      "[ ${concatStringsSep " " (map show v)} ]"
    else if isAttrs v && v ? outPath then
      toString v.outPath
    else if isAttrs v then
      "{ ${concatStringsSep "; " (attrNames v)} }"
    else
      typeOf v;

  # ---- properties: push mkIf/mkMerge/mkOverride down to plain values -------------------------
  # A definition is { conds; prio; value; }: its conditions are not evaluated here.
  normalize =
    conds: prio: v:
    let
      tag = tagOf v;
    in
    if tag == "if" then
      normalize (conds ++ [ v.condition ]) prio v.content
    else if tag == "merge" then
      concatMap (normalize conds prio) v.contents
    else if tag == "override" then
      normalize conds v.priority v.content
    else
      [
        {
          inherit conds prio;
          value = v;
        }
      ];
  active = def: all (c: c) def.conds;
  highest =
    defs:
    let
      best = foldl' (m: d: if d.prio < m then d.prio else m) 100000 defs;
    in
    filter (d: d.prio == best) defs;
  childDefs =
    name: defs:
    concatMap (d: if d.value ? ${name} then normalize d.conds d.prio d.value.${name} else [ ]) defs;

  # ---- the tree ------------------------------------------------------------------------------------
  # A node's attributes: its declared options and namespaces and, where it declares no option
  # itself, whatever the definitions name (freeform).
  evalNode =
    path: opts: defs:
    let
      strict = any isOption (attrValues opts);
      attrDefs = filter (d: isPlainAttrs d.value) defs;
      leafDefs = filter (d: !(isPlainAttrs d.value)) defs;
      defNames = unique (concatMap (d: attrNames d.value) attrDefs);
      names = if strict then attrNames opts else unique (attrNames opts ++ defNames);
      unknown = filter (n: !(opts ? ${n}) && any active (childDefs n attrDefs)) defNames;
      child =
        n:
        let
          sub = childDefs n attrDefs;
        in
        if !(opts ? ${n}) then
          freeNode (path ++ [ n ]) sub
        else if isOption opts.${n} then
          evalOption (path ++ [ n ]) opts.${n} sub
        else
          evalNode (path ++ [ n ]) opts.${n} sub;
      value = listToAttrs (
        map (n: {
          name = n;
          value = child n;
        }) names
      );
    in
    if strict && unknown != [ ] then
      throw "The option `${showPath (path ++ [ (head unknown) ])}' does not exist."
    else if opts != { } && any active leafDefs then
      throw "The option set `${showPath path}' was given a value: ${show (head (filter active leafDefs)).value}"
    else
      value;

  freeNode =
    path: defs:
    let
      attrDefs = filter (d: isPlainAttrs d.value) defs;
      leafDefs = filter (d: !(isPlainAttrs d.value)) defs;
    in
    if leafDefs == [ ] then
      evalNode path { } defs
    else if attrDefs == [ ] || any active leafDefs then
      mergeLeaf path leafDefs
    else
      evalNode path { } attrDefs;

  absent = {
    _type = "absent";
  };
  # An undeclared value: the active definitions of the highest priority, lists concatenated,
  # anything else required to be one value.
  mergeLeaf =
    path: defs:
    let
      top = highest (filter active defs);
      values = map (d: d.value) top;
    in
    if top == [ ] then
      absent
    else if all isList values then
      concatLists values
    else if all (v: v == head values) values then
      head values
    else
      throw "The option `${showPath path}' has conflicting definition values: ${concatStringsSep ", " (map show values)}";

  # ---- declared options ------------------------------------------------------------------------
  evalOption =
    path: opt: defs:
    let
      top = highest (filter active defs);
    in
    if top != [ ] then
      evalType path opt.type (map (d: d.value) top)
    else if opt ? default then
      evalType path opt.type [ opt.default ]
    else
      throw "The option `${showPath path}' is used but not defined.";

  typeError =
    path: type: v:
    throw "The option `${showPath path}' has a value ${show v} that is not of type ${type.description}.";
  checkAll = path: type: values: all (v: type.check v || typeError path type v) values;

  evalType =
    path: type: values:
    let
      kind = type.kind;
    in
    assert checkAll path type values;
    if kind == "submodule" then
      evalNode path type.options (concatMap (normalize [ ] 100) values)
    else if kind == "nullOr" then
      (
        if all (v: v == null) values then
          null
        else if any (v: v == null) values then
          throw "The option `${showPath path}' is defined both null and not null."
        else
          evalType path type.elemType values
      )
    else if kind == "either" then
      (
        if all type.left.check values then
          evalType path type.left values
        else if all type.right.check values then
          evalType path type.right values
        else
          throw "The option `${showPath path}' mixes definitions of ${type.description}."
      )
    else if kind == "list" then
      let
        items = concatLists values;
      in
      genList (i: evalType (path ++ [ "[${toString i}]" ]) type.elemType [ (elemAt items i) ]) (
        length items
      )
    else if kind == "attrs" then
      let
        defs = concatMap (normalize [ ] 100) values;
        names = unique (concatMap (d: attrNames d.value) defs);
      in
      listToAttrs (
        map (n: {
          name = n;
          value = evalType (path ++ [ n ]) type.elemType (
            map (d: d.value) (highest (filter active (childDefs n defs)))
          );
        }) names
      )
    else if all (v: v == head values) values then
      head values
    else
      throw "The option `${showPath path}' has conflicting definition values: ${concatStringsSep ", " (map show values)}";

  # ---- the result -------------------------------------------------------------------------------
  mergeOptionTrees =
    a: b:
    a
    // mapAttrs (
      n: v:
      if !(a ? ${n}) then
        v
      else if isOption v || isOption a.${n} then
        throw "The option `${n}' is declared twice."
      else
        mergeOptionTrees a.${n} v
    ) b;
  options = foldl' mergeOptionTrees { } (map (m: m.options or { }) modules);
  config = evalNode [ ] options (concatMap (m: normalize [ ] 100 (definitionOf m)) modules);

  # Drop what only inactive definitions (a false mkIf) put in the tree.
  prune =
    v:
    if isPlainAttrs v then
      let
        pruned = mapAttrs (_: prune) v;
        kept = filter (n: tagOf pruned.${n} != "absent") (attrNames pruned);
      in
      if v != { } && kept == [ ] then
        absent
      else
        listToAttrs (
          map (n: {
            name = n;
            value = pruned.${n};
          }) kept
        )
    else if isList v then
      map prune v
    else
      v;
  final = prune config;

  describeType =
    type:
    {
      inherit (type) description;
    }
    // (
      if type.kind == "submodule" then
        { options = describeOptions type.options; }
      else if type.kind == "nullOr" || type.kind == "list" || type.kind == "attrs" then
        { elemType = describeType type.elemType; }
      else if type.kind == "either" then
        {
          left = describeType type.left;
          right = describeType type.right;
        }
      else
        { }
    );
  describeOptions = mapAttrs (
    _: v:
    if isOption v then
      {
        _option = true;
        type = describeType v.type;
        hasDefault = v ? default;
      }
    else
      describeOptions v
  );
in
{
  config = final;
  options = describeOptions options;
  failedAssertions = map (a: a.message) (filter (a: !a.assertion) (final.assertions or [ ]));
  configText = final.system.build.embassyConfig.text or null;
}
