// `ubcache ctl`: a running `ubcache serve`, operated through its control
// socket. bcache's sysfs tree as people use sysfs (cat, write, ls, tree),
// bcache-tools' `bcache` verbs over those same writes (show, register,
// unregister, attach, detach, set-cachemode, stop), and ubcache's own
// status, stats and wait-clean. One file per concern under ctl/; this one
// parses the command line and dispatches, loading a command's module when it
// runs (ctl is started often, by scripts and tests: reading superblocks
// pulls in the device and NBD code, which the sysfs commands do not need).

import { parseArgs, type ParseArgsConfig } from 'node:util';
import { defaultControlPath } from '../control/paths.ts';
import { CliError, type Subcommand } from './common.ts';
import { processOutput } from './output.ts';
import { Control } from './ctl/connection.ts';
import { PERIODS, type Period } from './ctl/periods.ts';
import { cat, ls, tree } from './ctl/sysfs-commands.ts';
import { registered } from './ctl/tree-json.ts';
import { parseSeconds } from './ctl/watch.ts';

const HELP = `Usage: ubcache ctl [--control PATH] COMMAND [ARGS]

Operate a running ubcache serve: bcache's sysfs attributes, and bcache-tools'
\`bcache\` verbs over them. Paths are the kernel's; the leading /sys may be
omitted. DEV is bcacheN, a device's path or URI as registered, or a backing
device's or cache set's uuid.

bcache verbs (as bcache-tools' bcache):
  show [-m] [-d DEV]     registered devices (-m: with uuids); -d: DEV's superblock
  register DEV...        register cache or backing devices (they start serving)
  unregister DEV         stop a backing device, or unregister a cache device's set
  attach CSET|CACHEDEV DEV
                         attach backing device DEV to a cache set
  detach DEV             detach DEV from its cache set (dirty data written back first)
  set-cachemode DEV MODE writethrough, writeback, writearound or none
  stop DEV               stop a backing device, or a cache device's set

ubcache's own:
  status                 cache sets and bcache devices: state, mode, dirty data, hit ratio
  stats [--total|--day|--hour|--five-minute] [--json] [--watch SECONDS]
                         hit and miss counters of every device and set
  wait-clean [-d DEV] [--timeout SECONDS]
                         wait until dirty data is written back (exit 124 on timeout)

sysfs:
  cat PATH               print an attribute, e.g. cat block/bcache0/bcache/state
  write PATH VALUE       write an attribute (echo VALUE > PATH), e.g.
                         write /sys/block/bcache0/bcache/cache_mode writeback
  ls [PATH]              list a directory (default /sys/fs/bcache)
  tree [PATH]            every attribute below PATH (default /sys) with its value

Options:
  --control PATH         the control socket (default $XDG_RUNTIME_DIR/ubcache/control.sock,
                         else /run/ubcache/control.sock)
  -h, --help             show this help
`;

const HINT = "Run 'ubcache ctl --help' for the commands.";
const COMMANDS =
  'show, register, unregister, attach, detach, set-cachemode, stop, status, stats, wait-clean, cat, write, ls, tree';

/** --control and --help before the command; the command and its arguments after. */
function splitGlobal(args: string[]): { control?: string; help: boolean; cmd?: string; rest: string[] } {
  let control: string | undefined;
  let help = false;
  for (let i = 0; i < args.length; i++) {
    const a = args[i] ?? '';
    if (a === '--control') {
      control = args[++i];
      if (control === undefined) throw new CliError('option --control needs a PATH', { hint: HINT });
    } else if (a.startsWith('--control=')) {
      control = a.slice('--control='.length);
    } else if (a === '-h' || a === '--help') {
      help = true;
    } else if (a.startsWith('-') && a !== '-') {
      throw new CliError(`unknown option '${a}' before the command`, { hint: HINT });
    } else {
      return { ...(control === undefined ? {} : { control }), help, cmd: a, rest: args.slice(i + 1) };
    }
  }
  return { ...(control === undefined ? {} : { control }), help, rest: [] };
}

/** A command's own options (--control may also come after the command, as it always could). */
function parseCommand<const O extends NonNullable<ParseArgsConfig['options']>>(
  cmd: string,
  args: string[],
  options: O,
) {
  try {
    return parseArgs({
      args,
      options: { ...options, control: { type: 'string' }, help: { type: 'boolean', short: 'h' } },
      allowPositionals: true,
      strict: true,
    });
  } catch (err) {
    throw new CliError(`${cmd}: ${err instanceof Error ? err.message : String(err)}`, { hint: HINT });
  }
}

function usage(text: string): CliError {
  return new CliError(`usage: ubcache ctl ${text}`, { hint: HINT });
}

export const run: Subcommand = async (args) => {
  const global = splitGlobal(args);
  const { cmd, rest } = global;
  if (global.help || cmd === 'help') {
    process.stdout.write(HELP);
    return 0;
  }
  if (cmd === undefined) throw new CliError('no command given', { hint: HINT });
  const out = processOutput.stdout;
  const control = (parsed: { values: { control?: string | undefined } }): Control =>
    new Control(parsed.values.control ?? global.control ?? defaultControlPath());
  /** The command's operands, between min and max of them (with -h: its usage printed, none). */
  const operands = (
    parsed: { positionals: string[]; values: { help?: boolean | undefined } },
    min: number,
    max: number,
    text: string,
  ): string[] => {
    if (parsed.values.help === true) {
      out.write(`usage: ubcache ctl ${text}\n`);
      return [];
    }
    const p = parsed.positionals;
    if (p.length < min || p.length > max) throw usage(text);
    return p;
  };
  switch (cmd) {
    case 'cat':
    case 'write':
    case 'ls':
    case 'tree':
    case 'status': {
      const texts = {
        cat: 'cat PATH',
        write: 'write PATH VALUE',
        ls: 'ls [PATH]',
        tree: 'tree [PATH]',
        status: 'status',
      };
      const counts = { cat: [1, 1], write: [2, 2], ls: [0, 1], tree: [0, 1], status: [0, 0] } as const;
      const parsed = parseCommand(cmd, rest, {});
      const [min, max] = counts[cmd];
      const p = operands(parsed, min, max, texts[cmd]);
      if (parsed.values.help === true) return 0;
      const ctl = control(parsed);
      if (cmd === 'cat') out.write(await cat(ctl, p[0] ?? ''));
      else if (cmd === 'write') await ctl.write(p[0] ?? '', p[1] ?? '');
      else if (cmd === 'ls') out.write(await ls(ctl, p[0] ?? '/sys/fs/bcache'));
      else if (cmd === 'tree') out.write(await tree(ctl, p[0] ?? '/sys'));
      else out.write((await import('./ctl/status.ts')).status(await ctl.json()));
      return 0;
    }
    case 'show': {
      const parsed = parseCommand(cmd, rest, {
        device: { type: 'string', short: 'd' },
        more: { type: 'boolean', short: 'm' },
      });
      operands(parsed, 0, 0, 'show [-m] [-d DEV]');
      if (parsed.values.help === true) return 0;
      const ctl = control(parsed);
      const { showDetail, showDevices } = await import('./ctl/show.ts');
      const dev = parsed.values.device;
      out.write(
        dev !== undefined
          ? await showDetail(ctl, dev)
          : await showDevices(registered(await ctl.json()), parsed.values.more === true),
      );
      return 0;
    }
    case 'register': {
      const parsed = parseCommand(cmd, rest, {});
      const p = operands(parsed, 1, Infinity, 'register DEV...');
      if (parsed.values.help === true) return 0;
      await (await import('./ctl/verbs.ts')).register(control(parsed), p);
      return 0;
    }
    case 'unregister':
    case 'stop':
    case 'detach': {
      const parsed = parseCommand(cmd, rest, {});
      const [dev] = operands(parsed, 1, 1, `${cmd} DEV`);
      if (parsed.values.help === true || dev === undefined) return 0;
      const { detach, unregister } = await import('./ctl/verbs.ts');
      if (cmd === 'detach') {
        const note = await detach(control(parsed), dev);
        if (note !== undefined) process.stderr.write(`ubcache ctl: ${note}\n`);
      } else {
        await unregister(control(parsed), dev, cmd);
      }
      return 0;
    }
    case 'attach': {
      const parsed = parseCommand(cmd, rest, {});
      const [to, dev] = operands(parsed, 2, 2, 'attach CSET_UUID|CACHEDEV DEV');
      if (parsed.values.help === true || to === undefined || dev === undefined) return 0;
      await (await import('./ctl/verbs.ts')).attach(control(parsed), to, dev);
      return 0;
    }
    case 'set-cachemode': {
      const parsed = parseCommand(cmd, rest, {});
      const [dev, mode] = operands(parsed, 2, 2, 'set-cachemode DEV writethrough|writeback|writearound|none');
      if (parsed.values.help === true || dev === undefined || mode === undefined) return 0;
      await (await import('./ctl/verbs.ts')).setCacheMode(control(parsed), dev, mode);
      return 0;
    }
    case 'stats': {
      const parsed = parseCommand(cmd, rest, {
        total: { type: 'boolean' },
        day: { type: 'boolean' },
        hour: { type: 'boolean' },
        'five-minute': { type: 'boolean' },
        json: { type: 'boolean' },
        watch: { type: 'string' },
      });
      operands(parsed, 0, 0, 'stats [--total|--day|--hour|--five-minute] [--json] [--watch SECONDS]');
      if (parsed.values.help === true) return 0;
      const v = parsed.values;
      const chosen: Period[] = PERIODS.filter((p) => v[p === 'five_minute' ? 'five-minute' : p] === true);
      if (chosen.length > 1) throw new CliError('stats: choose one of --total, --day, --hour, --five-minute');
      let watchSeconds: number | undefined;
      if (v.watch !== undefined) watchSeconds = seconds('--watch', v.watch);
      await (
        await import('./ctl/stats.ts')
      ).stats(
        control(parsed),
        {
          periods: chosen.length > 0 ? chosen : PERIODS,
          json: v.json === true,
          ...(watchSeconds === undefined ? {} : { watchSeconds }),
        },
        out,
      );
      return 0;
    }
    case 'wait-clean': {
      const parsed = parseCommand(cmd, rest, { device: { type: 'string', short: 'd' }, timeout: { type: 'string' } });
      operands(parsed, 0, 0, 'wait-clean [-d DEV] [--timeout SECONDS]');
      if (parsed.values.help === true) return 0;
      const { device, timeout } = parsed.values;
      await (
        await import('./ctl/wait-clean.ts')
      ).waitClean(
        control(parsed),
        {
          ...(device === undefined ? {} : { device }),
          ...(timeout === undefined ? {} : { timeoutSeconds: seconds('--timeout', timeout) }),
        },
        out,
        processOutput.stderr,
      );
      return 0;
    }
    default:
      throw new CliError(`unknown command '${cmd}'`, { hint: `The commands are ${COMMANDS}.` });
  }
};

function seconds(option: string, text: string): number {
  try {
    return parseSeconds(option, text);
  } catch (err) {
    throw new CliError(err instanceof Error ? err.message : String(err), { hint: HINT });
  }
}
