"""SMS: the Kannel and Twilio adapters, and the GSM 03.38 / UCS-2 text rules they share (`text`)."""
