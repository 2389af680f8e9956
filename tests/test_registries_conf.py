"""registries.conf read as containers/image reads it: files, drop-ins, prefixes, mirrors,
short names."""

from __future__ import annotations

import pytest

from dkr.errors import DkrError
from dkr.registry import registries_conf as rc
from dkr.registry.reference import parse_reference


def _load(tmp_path, text: str, **kw) -> rc.RegistriesConf:
    path = tmp_path / "registries.conf"
    path.write_text(text)
    return rc.load(str(path), **kw)


def _sources(conf, text):
    return [(str(s.reference), s.mirror, s.insecure) for s in conf.sources(parse_reference(text))]


def test_longest_prefix_wins_and_location_rewrites(tmp_path):
    conf = _load(tmp_path, """
[[registry]]
prefix = "example.com"
location = "mirror.example.net/all"

[[registry]]
prefix = "example.com/team"
location = "harbor.example.org:8443/proxy/team"
""")
    assert _sources(conf, "example.com/team/app:1") == [
        ("harbor.example.org:8443/proxy/team/app:1", False, False)]
    assert _sources(conf, "example.com/other/app:1") == [
        ("mirror.example.net/all/other/app:1", False, False)]
    # "example.com/teamwork" is not below the prefix "example.com/team".
    assert _sources(conf, "example.com/teamwork/app") == [
        ("mirror.example.net/all/teamwork/app:latest", False, False)]
    assert _sources(conf, "other.org/app") == [("other.org/app:latest", False, False)]


def test_wildcard_prefix_matches_subdomains_only(tmp_path):
    conf = _load(tmp_path, """
[[registry]]
prefix = "*.example.com"
insecure = true
[[registry.mirror]]
location = "cache.local:5000"
""")
    assert _sources(conf, "a.example.com/x/y:t") == [
        ("cache.local:5000/x/y:t", True, False), ("a.example.com/x/y:t", False, True)]
    assert _sources(conf, "example.com/x") == [("example.com/x:latest", False, False)]
    assert _sources(conf, "a.example.com.evil.org/x") == [
        ("a.example.com.evil.org/x:latest", False, False)]


def test_mirrors_in_order_by_reference_kind(tmp_path):
    conf = _load(tmp_path, """
[[registry]]
location = "docker.io"
[[registry.mirror]]
location = "all.local"
[[registry.mirror]]
location = "digests.local"
pull-from-mirror = "digest-only"
[[registry.mirror]]
location = "tags.local"
pull-from-mirror = "tag-only"
insecure = true
""")
    digest = "sha256:" + "a" * 64
    assert _sources(conf, "debian:12") == [
        ("all.local/library/debian:12", True, False),
        ("tags.local/library/debian:12", True, True),
        ("docker.io/library/debian:12", False, False)]
    assert [s[0] for s in _sources(conf, f"debian@{digest}")] == [
        f"all.local/library/debian@{digest}", f"digests.local/library/debian@{digest}",
        f"docker.io/library/debian@{digest}"]


def test_mirror_by_digest_only(tmp_path):
    conf = _load(tmp_path, """
[[registry]]
location = "quay.io"
mirror-by-digest-only = true
[[registry.mirror]]
location = "cache.local"
""")
    assert len(_sources(conf, "quay.io/a/b:1")) == 1
    assert len(_sources(conf, "quay.io/a/b@sha256:" + "b" * 64)) == 2


def test_blocked_is_refused_naming_the_file(tmp_path):
    conf = _load(tmp_path, '[[registry]]\nlocation = "evil.example"\nblocked = true\n')
    with pytest.raises(DkrError, match=r"registry evil.example is blocked in .*registries.conf"):
        conf.sources(parse_reference("evil.example/x"))


def test_drop_ins_replace_prefixes_and_merge_aliases(tmp_path, monkeypatch):
    home = tmp_path / "home"
    user = home / ".config/containers"
    (user / "registries.conf.d").mkdir(parents=True)
    (user / "registries.conf").write_text("""
unqualified-search-registries = ["one.example", "two.example"]
short-name-mode = "enforcing"
[aliases]
"app" = "one.example/team/app"
[[registry]]
location = "one.example"
insecure = true
""")
    (user / "registries.conf.d/50-b.conf").write_text("""
[aliases]
"tool" = "two.example/tool"
[[registry]]
location = "one.example"
[[registry.mirror]]
location = "near.example"
""")
    (user / "registries.conf.d/10-a.conf").write_text('short-name-mode = "permissive"\n')
    monkeypatch.delenv("CONTAINERS_REGISTRIES_CONF", raising=False)
    conf = rc.load(home=home)
    assert conf.files == [str(user / "registries.conf"), str(user / "registries.conf.d/10-a.conf"),
                          str(user / "registries.conf.d/50-b.conf")]
    assert conf.short_name_mode == "permissive"
    assert set(conf.aliases) == {"app", "tool"}
    assert _sources(conf, "one.example/x") == [
        ("near.example/x:latest", True, False), ("one.example/x:latest", False, False)]


def test_environment_names_the_one_file(tmp_path, monkeypatch):
    path = tmp_path / "only.conf"
    path.write_text('unqualified-search-registries = ["q.example"]\n')
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(path))
    assert rc.load().files == [str(path)]
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(tmp_path / "missing.conf"))
    with pytest.raises(DkrError, match="missing.conf does not exist"):
        rc.load()


def test_short_names(tmp_path):
    conf = _load(tmp_path, """
unqualified-search-registries = ["one.example:5000", "docker.io"]
short-name-mode = "enforcing"
[aliases]
"app" = "aliased.example/team/app"
""")
    # An alias always wins; tag and digest are kept.
    assert [str(r) for r in conf.candidates("app:2", terminal=False)] == \
        ["aliased.example/team/app:2"]
    # Qualified names are not short names.
    assert [str(r) for r in conf.candidates("localhost/app", terminal=False)] == \
        ["localhost/app:latest"]
    with pytest.raises(DkrError, match=r"ambiguous .* enforcing .*one.example:5000/busybox:latest, "
                                       r"docker.io/library/busybox:latest"):
        conf.candidates("busybox", terminal=False)
    chosen = conf.candidates("busybox", terminal=True, choose=lambda found: found[1])
    assert [str(r) for r in chosen] == ["docker.io/library/busybox:latest"]
    conf.short_name_mode = "permissive"
    assert len(conf.candidates("busybox", terminal=False)) == 2
    conf.search = []
    with pytest.raises(DkrError, match="no unqualified-search registries are defined"):
        conf.candidates("busybox", terminal=False)


def test_no_configuration_keeps_docker_hub_for_short_names():
    assert [str(r) for r in rc.RegistriesConf().candidates("busybox", terminal=False)] == \
        ["docker.io/library/busybox:latest"]


@pytest.mark.parametrize("text, message", [
    ('[[registry]]\nprefix = "a.example"\n', "needs a location"),
    ('[[registry]]\nlocation = "https://a.example"\n', "URI schemes are not supported"),
    ('[[registry]]\nprefix = "*.a.example/x"\n', "wildcard prefix"),
    ('[[registry]]\nlocation = "a.example"\n[[registry.mirror]]\nlocation = "m"\n'
     'pull-from-mirror = "sometimes"\n', "pull-from-mirror"),
    ('short-name-mode = "lenient"\n', "short-name-mode must be"),
    ('[aliases]\n"x" = "y"\n', "invalid alias"),
    ('[[registry]]\nlocation = "a.example"\ninsecure = true\n[[registry]]\nprefix = "a.example/b"\n'
     'location = "a.example"\n', "conflicting"),
    ("this is = not toml =", "not valid TOML"),
])
def test_bad_files_are_one_error_naming_the_file(tmp_path, text, message):
    with pytest.raises(DkrError, match=message) as caught:
        _load(tmp_path, text)
    assert "registries.conf" in str(caught.value)


def test_version_1_tables_are_converted(tmp_path):
    conf = _load(tmp_path, """
[registries.search]
registries = ["one.example"]
[registries.insecure]
registries = ["plain.example:5000"]
[registries.block]
registries = ["evil.example"]
""")
    assert conf.search == ["one.example"]
    assert _sources(conf, "plain.example:5000/x") == [("plain.example:5000/x:latest", False, True)]
    with pytest.raises(DkrError, match="blocked"):
        conf.sources(parse_reference("evil.example/x"))


def test_a_choice_at_the_prompt_is_recorded_where_podman_keeps_it(tmp_path):
    cache = tmp_path / "cache/containers/short-name-aliases.conf"
    path = tmp_path / "registries.conf"
    path.write_text('unqualified-search-registries = ["one.example", "two.example"]\n'
                    'short-name-mode = "enforcing"\n[aliases]\n"tool" = "one.example/tool"\n')
    conf = rc.load(str(path), alias_cache=cache)
    asked = []
    chosen = conf.candidates("app:3", terminal=True,
                             choose=lambda found: asked.append(found) or found[1])
    assert [str(r) for r in chosen] == ["two.example/app:3"] and len(asked) == 1
    conf.record("app:3")
    assert '"app" = "two.example/app"' in cache.read_text()
    # Next time (podman's choices too) nobody is asked; the cache comes before registries.conf.
    cache.write_text(cache.read_text() + '"tool" = "two.example/other-tool"\n')
    conf = rc.load(str(path), alias_cache=cache)
    assert [str(r) for r in conf.candidates("app", terminal=False)] == ["two.example/app:latest"]
    assert [str(r) for r in conf.candidates("tool", terminal=False)] == \
        ["two.example/other-tool:latest"]


def test_insecure_hosts_as_registry_or_mirror(tmp_path):
    conf = _load(tmp_path, '[[registry]]\nlocation = "a.example"\ninsecure = true\n'
                           '[[registry]]\nlocation = "b.example"\n'
                           '[[registry.mirror]]\nlocation = "m.example:5000/ns"\ninsecure = true\n')
    assert conf.insecure("a.example") and conf.insecure("m.example:5000")
    assert not conf.insecure("b.example") and not conf.insecure("c.example")
