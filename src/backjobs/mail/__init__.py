"""Email: templates and rendering (:mod:`.render`), and the transports that send a rendered
message (:mod:`.transport`: SMTP, or .eml files in a pickup folder)."""
