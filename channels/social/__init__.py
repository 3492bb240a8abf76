"""The platforms: Messenger (`facebook`), X (`twitter`, its API client `twitter_api`) and Telegram,
with what they share (`common`: signatures, JSON bodies, attachments)."""
