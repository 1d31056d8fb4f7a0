"""The demo (``make demo``): crm-bridge doing its job, with everything it talks to simulated.

One command starts the RetailCRM simulator (an account per demo enterprise) and the PBX
simulator as processes of their own, seeds two enterprises with managers and extensions,
connects them to RetailCRM through the adapter's own operations, starts crm-bridge in
development mode, and replays realistic calls at a steady rate until Ctrl-C. It prints
where to look: what each simulated RetailCRM received, the admin pages of both
enterprises, health and metrics, and how to click a number as RetailCRM would.

| module | owns |
|---|---|
| :mod:`.cli` | ``python -m daemon.demo``: the run, from ports to the last child stopped |
| :mod:`.stack` | the child processes: started, waited for, watched, stopped |
| :mod:`.enterprises` | the two demo enterprises: platform rows, RetailCRM connected |
| :mod:`.scenarios` | realistic calls, as the Asterisk hosts report them (pure) |
| :mod:`.traffic` | calls at a steady rate through the call services' SQL insert or HTTP |
| :mod:`.guide` | what is printed: where to look, status lines |

The demo imports no adapter: it reaches RetailCRM through the adapter protocol
(``daemon.integrations.load``) and runs the simulator as a process.
"""
