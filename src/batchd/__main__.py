from batchd.cli import app

app()
