/**
 * Disk image formats recognised by their header (pure: no I/O). The magic bytes are those
 * qemu's block drivers probe for; a file whose header matches none of them is raw.
 */

/** Format names as qemu-img and qemu-nbd `-f` spell them. */
export type ImageFormat = 'qcow2' | 'qcow' | 'qed' | 'vmdk' | 'vhdx' | 'vdi' | 'vpc' | 'luks';

/** Bytes of the header detectImageFormat looks at (the VDI signature sits at 0x40). */
export const IMAGE_HEADER_BYTES = 512;

const VDI_SIGNATURE = 0xbeda107f;

const startsWith = (b: Buffer, magic: string): boolean => b.length >= magic.length && b.subarray(0, magic.length).equals(Buffer.from(magic, 'latin1'));

/** The image format whose magic begins `header` (the file's first bytes), or undefined (raw). */
export function detectImageFormat(header: Buffer): ImageFormat | undefined {
  if (startsWith(header, 'QFI\xfb')) return header.length >= 8 && header.readUInt32BE(4) === 1 ? 'qcow' : 'qcow2';
  if (startsWith(header, 'QED\0')) return 'qed';
  if (startsWith(header, 'KDMV') || startsWith(header, 'COWD') || startsWith(header, '# Disk DescriptorFile')) return 'vmdk';
  if (startsWith(header, 'vhdxfile')) return 'vhdx';
  if (startsWith(header, 'conectix')) return 'vpc';
  if (startsWith(header, 'LUKS\xba\xbe')) return 'luks';
  if (header.length >= 0x44 && header.readUInt32LE(0x40) === VDI_SIGNATURE) return 'vdi';
  return undefined;
}
