from jaxt2i.main import run

run()
