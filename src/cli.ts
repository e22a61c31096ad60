import cluster from 'node:cluster'
import { Command, CommanderError, Option } from 'commander'
import { version } from './assets.js'
import { loadConfig, OPTIONS, workerConfigFromEnv, type Config } from './config.js'
import { ConfigError } from './errors.js'
import { journaldStream, priorityPrefix } from './log.js'
import { Primary } from './primary.js'
import { Worker } from './worker.js'

/**
 * The edge: the `meliproxy` command. In the primary it parses flags and the environment into a Config and starts
 * the primary; in a forked worker it reads the Config the primary passed and starts the worker.
 */

const EXIT_USAGE = 2

function buildProgram(ver: string): Command {
  const program = new Command('meliproxy')
    .description('An API proxy that controls and measures HTTP traffic to one upstream.')
    .version(ver, '-v, --version')
    .helpOption('-h, --help', 'show this help')
    .exitOverride()
    .configureOutput({ outputError: (str, write) => write(str.split('\n')[0] + '\n') })
    .addHelpText(
      'after',
      '\nEvery option can also be set by its environment variable or by its camelCase key in the config file.\n' +
        'Precedence: flag > environment > config file > default.\n\nEnvironment variables:\n' +
        OPTIONS.map((o) => `  ${o.env.padEnd(28)} ${o.flags.replace(/^-\w, /, '')}`).join('\n') +
        '\n',
    )
  for (const o of OPTIONS) {
    const option = new Option(o.flags, `${o.help} (default: ${o.defaultText}; env ${o.env})`)
    program.addOption(option)
  }
  return program
}

/** Parses argv and env into a Config; throws ConfigError or CommanderError. */
function configFrom(program: Command, env: NodeJS.ProcessEnv): Config {
  const opts = program.opts<Record<string, unknown>>()
  const flags: Record<string, unknown> = {}
  for (const o of OPTIONS) {
    const name = o.key === 'configFile' ? 'config' : o.key
    if (program.getOptionValueSource(name) === 'cli') flags[o.key] = opts[name]
  }
  return loadConfig({ flags, env })
}

function fail(message: string): never {
  process.stderr.write(`${priorityPrefix('error', journaldStream(2))}meliproxy: ${message}\n`)
  process.exit(EXIT_USAGE)
}

/**
 * The launcher's last resort (bin/meliproxy): an error nothing else handled is one JSON line at error priority (under
 * journald: `journalctl -p err` finds it), and exit 1.
 */
export function fatal(err: unknown): never {
  const error = err instanceof Error ? err.message : String(err)
  process.stderr.write(`${priorityPrefix('error', journaldStream(2))}${JSON.stringify({ level: 'error', msg: 'fatal', error })}\n`)
  process.exit(1)
}

/** Runs the command line. */
export async function main(argv: string[], env: NodeJS.ProcessEnv): Promise<void> {
  if (cluster.isWorker) {
    const worker = new Worker(workerConfigFromEnv(env))
    process.on('SIGTERM', () => worker.close('SIGTERM'))
    process.on('SIGINT', () => worker.close('SIGINT'))
    await worker.start()
    await worker.closed
    process.exit(0)
  }
  const ver = version()
  const program = buildProgram(ver)
  let config: Config
  try {
    program.parse(argv)
    config = configFrom(program, env)
  } catch (err) {
    if (err instanceof CommanderError) {
      if (err.exitCode === 0) process.exit(0)
      process.exit(EXIT_USAGE)
    }
    if (err instanceof ConfigError) fail(err.message)
    throw err
  }
  const primary = new Primary({ config, reloadConfig: () => configFrom(program, env), version: ver })
  process.on('SIGTERM', () => primary.close('SIGTERM'))
  process.on('SIGINT', () => primary.close('SIGINT'))
  process.on('SIGHUP', () => void primary.reload())
  try {
    await primary.start()
  } catch (err) {
    if (err instanceof ConfigError) fail(err.message) // an address that can never be listened on: exit 2, no restart loop
    throw err
  }
  process.exit(await primary.stopped)
}
