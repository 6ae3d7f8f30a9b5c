"""The message a person gets, in their language: one TOML file per locale (``en.toml``,
``pt-BR.toml``) with text forms (sms, whatsapp), speech forms (call) and the call's voice
language; the pure renderer (``render``), the SMS segment arithmetic (``segments``), and the
catalog that loads and checks them (``catalog``). See docs/languages.md."""
