#!/usr/bin/env node
// Before tests: make sure the real NBD servers and tools the interop tests use are installed.
// Installs the Debian packages when any is missing (as root, or with sudo). Exits 1 if it cannot.
import { execSync } from 'node:child_process';

const tools = { nbdkit: 'nbdkit', nbdcopy: 'libnbd-bin', nbdinfo: 'libnbd-bin', 'qemu-nbd': 'qemu-utils', 'qemu-img': 'qemu-utils', 'nbd-server': 'nbd-server', certtool: 'gnutls-bin', psktool: 'gnutls-bin' };
const have = (t) => {
  try {
    execSync(`command -v ${t}`, { stdio: 'ignore', shell: '/bin/sh' });
    return true;
  } catch {
    return false;
  }
};
const missing = Object.keys(tools).filter((t) => !have(t));
if (missing.length === 0) process.exit(0);
const pkgs = 'nbdkit libnbd-bin qemu-utils nbd-server gnutls-bin';
console.error(`ensure-servers: missing ${missing.join(', ')}; installing ${pkgs}`);
const sudo = process.getuid && process.getuid() === 0 ? '' : 'sudo ';
try {
  execSync(`${sudo}apt-get update -qq && ${sudo}env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ${pkgs}`, { stdio: 'inherit', shell: '/bin/sh' });
} catch {
  console.error('ensure-servers: could not install the test servers; interop tests need them');
  process.exit(1);
}
const still = Object.keys(tools).filter((t) => !have(t));
if (still.length) {
  console.error(`ensure-servers: still missing after install: ${still.join(', ')}`);
  process.exit(1);
}
