"""The templates: one TOML file per locale, shipped here and added or overridden in
``TEMPLATES_DIR``; each is checked when loaded, and a bad one is refused with a message that
names its file and what is wrong (the worker stops on it)."""

from __future__ import annotations

import string
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

import langcodes

from phoneverify.models.templates.render import (
    PLACEHOLDERS,
    Template,
    text_candidates,
    web_otp_line,
)
from phoneverify.models.templates.segments import length, segment_limit, segments

#: Twilio's ``<Say>`` reads at most 4,096 characters.
SPEECH_LIMIT = 4096
_KEYS = frozenset({"voice", "text", "speech"})


class TemplateError(ValueError):
    """A template that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Budget:
    """The longest text a template must still send in one segment: the code's length, an app
    name as long as ``app`` and, when ``domain`` is set, the ``@domain #code`` line."""

    code_length: int = 10
    app: str = "A" * 30
    domain: str = ""
    minutes: int = 1


@dataclass(frozen=True)
class Catalog:
    """The templates in force, by locale tag (``en``, ``pt-BR``)."""

    templates: Mapping[str, Template]

    def __getitem__(self, locale: str) -> Template:
        return self.templates[locale]

    def get(self, locale: str | None, default: str) -> Template:
        """The template for ``locale``, else ``default``'s (say, a locale since removed)."""
        return self.templates.get(locale or default) or self.templates[default]

    @property
    def locales(self) -> list[str]:
        return sorted(self.templates)


def _fields(form: str, where: str) -> list[str]:
    """The placeholders of ``form``; only bare ``{code}``, ``{app}``, ``{minutes}``."""
    try:
        parts = list(string.Formatter().parse(form))
    except ValueError as error:
        raise TemplateError(f"{where}: {error} (write a literal brace as {{{{ or }}}})") from None
    fields = []
    for _literal, field, spec, conversion in parts:
        if field is None:
            continue
        if field not in PLACEHOLDERS:
            raise TemplateError(f"{where}: unknown placeholder {{{field}}} (use "
                                f"{', '.join('{' + p + '}' for p in sorted(PLACEHOLDERS))})")
        if spec or conversion:
            raise TemplateError(f"{where}: write {{{field}}} plain, without a format or "
                                "conversion")
        fields.append(field)
    return fields


def _forms(data: dict, key: str, source: str) -> tuple[str, ...]:
    forms = data.get(key)
    if isinstance(forms, str):
        forms = [forms]
    if not isinstance(forms, list) or not forms or not all(isinstance(f, str) for f in forms):
        raise TemplateError(f"{source}: `{key}` must be a string or a list of strings")
    for n, form in enumerate(forms, start=1):
        where = f"{source}: {key} form {n}"
        fields = _fields(form, where)
        if "code" not in fields:
            raise TemplateError(f"{where} has no {{code}}")
        if key == "speech" and fields.count("code") < 2:
            raise TemplateError(f"{where} says {{code}} once: a call says the code twice")
        if key == "speech" and len(form) > SPEECH_LIMIT:
            raise TemplateError(f"{where} is longer than {SPEECH_LIMIT} characters")
    if all("{app}" in form for form in forms):
        raise TemplateError(f"{source}: every {key} form has {{app}}: one without it is needed "
                            "for when APP_NAME is empty")
    return tuple(forms)


def parse(locale: str, source: str, data: dict) -> Template:
    """A template from a TOML file's content."""
    unknown = set(data) - _KEYS
    if unknown:
        raise TemplateError(f"{source}: unknown key {', '.join(sorted(unknown))} (the keys are "
                            "voice, text, speech)")
    voice = data.get("voice")
    if not isinstance(voice, str) or not langcodes.tag_is_valid(voice):
        raise TemplateError(f"{source}: `voice` must be the call's voice language, a tag such "
                            "as fr-FR")
    return Template(locale=locale, source=source, voice=voice,
                    text=_forms(data, "text", source), speech=_forms(data, "speech", source))


def check(template: Template, budget: Budget) -> None:
    """Refuse a template whose text cannot fit one SMS segment within ``budget``, with an app
    name or without one."""
    code = "8" * budget.code_length
    for app in ("", budget.app):
        candidates = text_candidates(template, code, app, budget.minutes, budget.domain)
        if not any(segments(body) == 1 for body in candidates):
            shortest = min(candidates, key=length)
            line = f" and the line '{web_otp_line(budget.domain, code)}'" if budget.domain else ""
            with_app = f"a {len(app)}-character app name" if app else "no app name"
            raise TemplateError(
                f"{template.source}: no text form fits one SMS segment with a "
                f"{budget.code_length}-digit code, {with_app}{line}: the shortest takes "
                f"{length(shortest)} characters of {segment_limit(shortest)} "
                f"({'GSM-7' if segment_limit(shortest) == 160 else 'UCS-2'})")


def read(path: Path | Traversable, budget: Budget) -> Template:
    """One template file, parsed and checked."""
    source = str(path)
    locale = path.name.removesuffix(".toml")
    if not langcodes.tag_is_valid(locale):
        raise TemplateError(f"{source}: the file name must be a locale tag (en.toml, "
                            "pt-BR.toml)")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise TemplateError(f"{source}: not valid TOML: {error}") from None
    template = parse(langcodes.standardize_tag(locale), source, data)
    check(template, budget)
    return template


def _files(folder: Path | Traversable) -> list[Traversable]:
    return sorted((f for f in folder.iterdir() if f.name.endswith(".toml")),
                  key=lambda f: f.name)


def load(budget: Budget, templates_dir: Path | None = None) -> Catalog:
    """The shipped templates, then those of ``templates_dir`` (which override or add)."""
    templates = {}
    shipped = resources.files("phoneverify.models.templates")
    for path in _files(shipped):
        template = read(path, budget)
        templates[template.locale] = template
    if templates_dir is not None:
        if not templates_dir.is_dir():
            raise TemplateError(f"TEMPLATES_DIR {templates_dir}: not a folder")
        for path in _files(templates_dir):
            template = read(path, budget)
            templates[template.locale] = template
    return Catalog(templates)
